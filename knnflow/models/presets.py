"""Model presets: the network and the training defaults that go with it, one record each.

Light (no torch): the command line's help lists the presets without importing the models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class UNetConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)
    head_channels: int = 64
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    """A network and its training defaults.

    unet: the U-Net's configuration, or None for the MLP. lr: Adam's rate after warm-up;
    warmup: linear warm-up steps; ema_decay: decay of the weights' moving average.
    summary: one line for the command line's help.
    """

    name: str
    summary: str
    unet: UNetConfig | None
    lr: float
    warmup: int
    ema_decay: float


# The paper's values for cifar; the small presets train in minutes on a CPU, with a larger
# step and a shorter warm-up and average.
PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    # digits 8×8 and MNIST 28×28 on a CPU: three levels (8→4→2, 28→14→7), attention at the
    # lowest, no dropout (short runs).
    # Step times: forward, backward and Adam on a 2-core Xeon (docs/benchmarks.md, "Start-up
    # and the tiny preset's step").
    Preset("tiny", "U-Net, 32 channels, mult 1,2,2, 1 block, for digits and MNIST on a CPU; "
           "on 2 cores a step takes ~0.15 s on digits and ~1 s on MNIST at batch 128 "
           "(~0.3 s at --batch-size 32)",
           UNetConfig(channels=32, channel_mult=(1, 2, 2), res_blocks=1, attention_levels=(2,),
                      head_channels=32, dropout=0.0),
           lr=1e-3, warmup=200, ema_decay=0.999),
    # The paper's CIFAR-10 network: 128 channels, mult 1,2,2,2, 2 res blocks, attention at
    # 16×16, heads of 64 channels (4 at 256 wide), dropout 0.1.
    Preset("cifar", "U-Net, 128 channels, mult 1,2,2,2, 2 blocks, attention at 16, dropout 0.1 "
           "(the paper's CIFAR-10 model)",
           UNetConfig(channels=128, channel_mult=(1, 2, 2, 2), res_blocks=2,
                      attention_levels=(1,), head_channels=64, dropout=0.1),
           lr=2e-4, warmup=5000, ema_decay=0.9999),
    # CelebA 64×64: one more level, attention at 16×16 and 8×8.
    Preset("celeba64", "U-Net, 128 channels, mult 1,2,2,2,4, attention at 16 and 8 (CelebA "
           "64×64)",
           UNetConfig(channels=128, channel_mult=(1, 2, 2, 2, 4), res_blocks=2,
                      attention_levels=(2, 3), head_channels=64, dropout=0.1),
           lr=2e-4, warmup=5000, ema_decay=0.9999),
    Preset("mlp", "MLP, 3 hidden layers of 256 (flat or toy data)", None,
           lr=1e-3, warmup=100, ema_decay=0.999),
)}


def preset_defaults(field: str) -> str:
    """A field's default per preset, for help text: '2e-4 cifar/celeba64, 1e-3 tiny/mlp'."""
    by_value: dict = {}
    for preset in PRESETS.values():
        by_value.setdefault(getattr(preset, field), []).append(preset.name)
    return ", ".join(f"{value:g} {'/'.join(names)}" for value, names in by_value.items())
