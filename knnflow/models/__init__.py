"""Velocity models v(x, t) and their presets."""

from __future__ import annotations

from torch import nn

from knnflow.errors import InputError
from knnflow.models.unet import MLP, UNet, UNetConfig

PRESETS: dict[str, UNetConfig | None] = {
    # digits 8×8 and MNIST 28×28 on a CPU: three levels (8→4→2, 28→14→7), attention at the
    # lowest, no dropout (short runs).
    "tiny": UNetConfig(channels=32, channel_mult=(1, 2, 2), res_blocks=1, attention_levels=(2,),
                       head_channels=32, dropout=0.0),
    # The paper's CIFAR-10 network: 128 channels, mult 1,2,2,2, 2 res blocks, attention at
    # 16×16, heads of 64 channels (4 at 256 wide), dropout 0.1.
    "cifar": UNetConfig(channels=128, channel_mult=(1, 2, 2, 2), res_blocks=2,
                        attention_levels=(1,), head_channels=64, dropout=0.1),
    # CelebA 64×64: one more level, attention at 16×16 and 8×8.
    "celeba64": UNetConfig(channels=128, channel_mult=(1, 2, 2, 2, 4), res_blocks=2,
                           attention_levels=(2, 3), head_channels=64, dropout=0.1),
    "mlp": None,
}
PRESET_HELP = {
    "tiny": "U-Net, 32 channels, mult 1,2,2, 1 block (digits, MNIST on CPU)",
    "cifar": "U-Net, 128 channels, mult 1,2,2,2, 2 blocks, attention at 16, dropout 0.1 "
             "(the paper's CIFAR-10 model)",
    "celeba64": "U-Net, 128 channels, mult 1,2,2,2,4, attention at 16 and 8 (CelebA 64×64)",
    "mlp": "MLP, 3 hidden layers of 256 (flat or toy data)",
}


def build_model(preset: str, image_shape: tuple[int, ...]) -> nn.Module:
    """The model of a preset for images of `image_shape` (C, H, W)."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if config is None:
        return MLP(image_shape)
    if len(image_shape) != 3:
        raise InputError(f"the {preset} preset needs C×H×W images, got shape {image_shape}; "
                         "use --preset mlp")
    try:
        return UNet(tuple(image_shape), config)
    except ValueError as err:
        raise InputError(f"--preset {preset}: {err}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MLP", "PRESETS", "PRESET_HELP", "UNet", "UNetConfig", "build_model",
           "count_parameters"]
