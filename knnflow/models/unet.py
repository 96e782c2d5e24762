"""A U-Net in the ADM family (Dhariwal & Nichol), written for knnflow: residual blocks with a
time embedding, self-attention at chosen levels, dropout. model(x, t) -> velocity, x shaped
(B, C, H, W), t shaped (B,) in [0, 1].

Layout: a 3×3 input convolution; per level, `res_blocks` residual blocks (with attention at
the levels in `attention_levels`) then a stride-2 downsample (not after the last level); a
middle of block, attention, block; the mirror path with `res_blocks + 1` blocks per level, each
taking a skip connection, and nearest-neighbour upsampling; GroupNorm, SiLU and a zero-
initialised 3×3 output convolution (the model starts at velocity 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from knnflow.errors import InputError
from knnflow.models.presets import PRESETS, UNetConfig


def _groups(channels: int) -> int:
    """32 groups where the width allows, fewer for the small presets."""
    return math.gcd(32, channels)


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal features of scale·t (t in [0, 1] spread over the usual 0..1000 range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        return x + self.out(out.transpose(-1, -2).reshape(b, c, h * w)).reshape(b, c, h, w)


class UNet(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], config: UNetConfig):
        super().__init__()
        channels_in, height, width = image_shape
        levels = len(config.channel_mult)
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"image size {height}×{width} is not divisible by "
                             f"{2 ** (levels - 1)} ({levels} levels)")
        self.image_shape, self.config = tuple(image_shape), config
        ch = config.channels
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.input = nn.Conv2d(channels_in, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width_now = [ch], ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.res_blocks):
                block = nn.ModuleList([ResBlock(width_now, ch * mult, emb_dim, config.dropout)])
                width_now = ch * mult
                if level in config.attention_levels:
                    block.append(Attention(width_now, config.head_channels))
                self.down.append(block)
                skips.append(width_now)
            if level < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(width_now, width_now, 3, stride=2,
                                                          padding=1)]))
                skips.append(width_now)
        self.middle = nn.ModuleList([ResBlock(width_now, width_now, emb_dim, config.dropout),
                                     Attention(width_now, config.head_channels),
                                     ResBlock(width_now, width_now, emb_dim, config.dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = config.channel_mult[level]
            for i in range(config.res_blocks + 1):
                block = nn.ModuleList([ResBlock(width_now + skips.pop(), ch * mult, emb_dim,
                                                config.dropout)])
                width_now = ch * mult
                if level in config.attention_levels:
                    block.append(Attention(width_now, config.head_channels))
                if level > 0 and i == config.res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(width_now, width_now, 3, padding=1))
                self.up.append(block)
        self.out_norm = nn.GroupNorm(_groups(width_now), width_now)
        self.out = nn.Conv2d(width_now, channels_in, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _run(block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        emb = self.time_embed(timestep_embedding(t, self.config.channels))
        h = self.input(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


class MLP(nn.Module):
    """For flat or toy data: [x, time features] → hidden layers (SiLU) → velocity."""

    def __init__(self, image_shape: tuple[int, ...], hidden: int = 256, layers: int = 3):
        super().__init__()
        self.image_shape = tuple(image_shape)
        dim = math.prod(image_shape)
        self.time_dim = 32
        widths = [dim + self.time_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            mods += [nn.Linear(a, b), nn.SiLU()]
        self.body = nn.Sequential(*mods)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        h = torch.cat([x.reshape(x.shape[0], -1), timestep_embedding(t, self.time_dim)], 1)
        return self.out(self.body(h)).reshape(x.shape)


def build_model(preset: str, image_shape: tuple[int, ...]) -> nn.Module:
    """The model of a preset for images of `image_shape` (C, H, W)."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    config = PRESETS[preset].unet
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
