"""The Wan 2.1 / 2.2 causal video VAE, with encode and decode whose working memory does not grow with video length.

Architecture (ARCH_FACTS §2): causal 3-D convolutions (time is padded in front only), RMS norms over channels, one
single-head attention per frame in the middle, 8x spatial and 4x temporal compression. Wan 2.2 adds a 2x2 pixel
unshuffle around the network (16x spatial) and parameter-free shortcuts around each stage. Module attributes follow
the original checkpoint names (`Wan2.1_VAE.pth`, ComfyUI's `wan_2.1_vae.safetensors`), so files load without renaming.

Time runs in causal chunks: encode feeds pixel frame 0, then frames 1-4, 5-8, ...; decode feeds one latent frame at a
time. A `CausalCache` carries each convolution's last input frames from one chunk to the next, so chunked results equal
those of the whole clip while working memory stays that of one chunk. Results go into a preallocated output on the
input's device: only the output grows with the number of frames. Large frames are split into overlapping spatial
tiles (`sora.vae_tiling`), chosen from a memory budget.

A LATENT holds raw VAE output (mu, not normalised), as in ComfyUI; `sora.latent_formats` normalises for the DiT.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import memory, vae_tiling
from .checkpoints import StateDict, build, describe, load_state_dict, strip_prefix
from .errors import CheckpointError, InputError
from .vae_tiling import Tiling

ProgressCallback = Callable[[int, int], None]  # (chunks done, chunks in all); may raise sora.errors.Interrupted


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    """Shape of a Wan VAE. Defaults are the Wan 2.1 VAE (`Wan2.1_VAE.pth`, 126.9M parameters)."""

    base_dim: int = 96  # encoder width of the first stage; stage widths are base_dim * dim_mult
    decoder_base_dim: int = 96  # decoder width of the last stage (2.2: 256, wider than its encoder)
    z_dim: int = 16  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # residual blocks per encoder stage; decoder stages have one more
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling; the decoder mirrors it
    patch_size: int = 1  # 2.2: 2x2 pixel unshuffle before the encoder and shuffle after the decoder
    residual_shortcuts: bool = False  # 2.2: parameter-free average/duplicate shortcut around each stage

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise InputError(f"temporal_downsample needs one flag per downsampling ({len(self.dim_mult) - 1}), "
                             f"got {len(self.temporal_downsample)}")
        if self.patch_size not in (1, 2):
            raise InputError(f"patch_size must be 1 (Wan 2.1) or 2 (Wan 2.2), got {self.patch_size}")
        if not self.residual_shortcuts and any(d % 2 for d in self.decoder_dims[1:-1]):
            raise InputError("the 2.1 decoder halves its width at each upsampling: decoder widths must be even")

    @classmethod
    def wan21(cls) -> VAEConfig:
        return cls()

    @classmethod
    def wan22(cls) -> VAEConfig:
        """`Wan2.2_VAE.pth` (TI2V-5B), 704.7M parameters."""
        return cls(base_dim=160, decoder_base_dim=256, z_dim=48, patch_size=2, residual_shortcuts=True)

    @classmethod
    def tiny(cls, **changes) -> VAEConfig:
        """The 2.1 layout at width 8 for tests; e.g. `tiny(patch_size=2, residual_shortcuts=True)` for 2.2's."""
        return replace(cls(base_dim=8, decoder_base_dim=8, z_dim=4), **changes)

    @property
    def in_channels(self) -> int:
        return 3 * self.patch_size ** 2

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along H and W."""
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first: F = 1 + temporal_factor * (T - 1)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def encoder_dims(self) -> list[int]:
        return [self.base_dim * m for m in (1,) + tuple(self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        return [self.decoder_base_dim * m for m in (self.dim_mult[-1],) + tuple(reversed(self.dim_mult))]


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------

ONEDNN_MIN_INPUT = 4096


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1, 1),
           padding=(0, 0, 0)) -> torch.Tensor:
    """`F.conv3d`, except that float32 inputs of at least `ONEDNN_MIN_INPUT` values on the CPU go through oneDNN.

    PyTorch sends a batch-1 convolution whose channels x frames x rows is at most 20480 to an im2col fallback, which
    copies the input once per kernel tap (27x for 3x3x3) and is 2-10x slower than oneDNN from a few thousand input
    values up (measured single-threaded, torch 2.13); that covers every layer of small tiles and small models.
    Below that size both take microseconds and oneDNN's per-shape setup dominates.
    """
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() >= ONEDNN_MIN_INPUT
            and torch.backends.mkldnn.is_available()):
        return torch.mkldnn_convolution(x.contiguous(), weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


class CausalCache:
    """What one video (one spatial tile of it) carries from a time chunk to the next.

    `tails[conv]` holds the last input frames of each cached convolution; `first_visit` tells modules whose first
    chunk is special (2.1/2.2 temporal upsampling skips its time conv on the first chunk).
    """

    def __init__(self):
        self.tails: dict[nn.Module, torch.Tensor] = {}
        self._seen: set[nn.Module] = set()

    def first_visit(self, module: nn.Module) -> bool:
        first = module not in self._seen
        self._seen.add(module)
        return first


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: `2 * padding[0]` frames in front, none behind.

    With a cache, the front padding is the previous chunk's last input frames instead of zeros. Spatial padding is
    left to the convolution itself (no padded copy of the input).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def input_buffer(self, like: torch.Tensor, cache: CausalCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A time-padded input [B, C, time_pad + T, H, W] for an input shaped like `like` [B, C, T, H, W]: the
        cached frames (zeros on the first chunk) in front, and the view of the last T frames for the caller to fill.
        """
        B, C, T, H, W = like.shape
        buffer = like.new_empty(B, C, self.time_pad + T, H, W)
        past = cache.tails.get(self) if cache is not None else None
        front = buffer[:, :, :self.time_pad]
        if past is None:
            front.zero_()
        else:
            front.copy_(past)
        return buffer, buffer[:, :, self.time_pad:]

    def convolve(self, buffer: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        """Convolve a filled `input_buffer`, first keeping its last frames for the next chunk."""
        if cache is not None:  # clone: a view would keep the whole buffer alive
            cache.tails[self] = buffer[:, :, -self.time_pad:].clone()
        return conv3d(buffer, self.weight, self.bias, self.stride, self.padding)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if not self.time_pad:
            return conv3d(x, self.weight, self.bias, self.stride, self.padding)
        buffer, frames = self.input_buffer(x, cache)
        frames.copy_(x)
        return self.convolve(buffer, cache)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned per-channel gain `gamma` ([C,1,1,1] or [C,1,1])."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise `x` [B, C, ...] into `out` (a new tensor if None) and return it."""
        # the norm is summed in float32 for half inputs, as the reference does for bf16/fp16
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12)
        out = torch.div(x, norm.to(x.dtype), out=out)
        return out.mul_(self.gamma * math.sqrt(self.gamma.shape[0]))


def norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """conv(silu(norm(x))), the activation written straight into the conv's time-padded input (no extra copy)."""
    buffer, frames = conv.input_buffer(x, cache)
    F.silu(norm(x, out=frames), inplace=True)
    return conv.convolve(buffer, cache)


class ResidualBlock(nn.Module):
    """[RMSNorm, SiLU, conv 3^3, RMSNorm, SiLU, dropout, conv 3^3] + shortcut (1^3 conv when widths differ).

    `residual` is a Sequential only so that its parameters carry the checkpoint's indices 0, 2, 3, 6.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = self.shortcut(x)
        x = norm_silu_conv(norm1, conv1, x, cache)
        x = norm_silu_conv(norm2, conv2, x, cache)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, scale 1/sqrt(C), plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [B*T, H*W, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [B*T, 1, H*W, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B * T, C, H, W)
        out = self.proj(out).view(B, T, C, H, W).transpose(1, 2)
        return out.add_(x)


class NearestUp(nn.Module):
    """2x nearest-neighbour upsampling of every frame [B, C, T, H, W] -> [B, C, T, 2H, 2W] (computed in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(1, 2, 2), mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """2x spatial up/downsampling, optionally with 2x temporal (`time_conv`).

    `resample` holds [parameter-free op, Conv2d] so the conv's keys are `resample.1.*`. The conv runs on all frames
    at once as a Conv3d with a 1x3x3 kernel, which avoids folding time into the batch and back.
      upsample2d/3d: nearest x2, then conv 3x3 (2.1 halves the width: `out_dim`);
        3d first runs `time_conv` (C -> 2C, causal k=3) and interleaves the two halves in time: T -> 2T frames.
        On the first chunk it is skipped, so 1 latent frame decodes to 1 frame.
      downsample2d/3d: zero-pad right and bottom by 1, conv 3x3 stride 2;
        3d then runs `time_conv` (k=3, stride 2, no padding) on [last frame of the previous chunk, this chunk];
        the first chunk passes through unchanged.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(NearestUp(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise InputError(f"unknown resample mode {mode!r}")

    def _spatial_conv(self, x: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        conv = self.resample[1]
        return conv3d(x, conv.weight.unsqueeze(2), conv.bias, (1, stride, stride), (0, padding, padding))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d" and not cache.first_visit(self):
            B, C, T, H, W = x.shape
            x = self.time_conv(x, cache).view(B, 2, C, T, H, W)
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)  # frame 2t+g from half g of frame t
        if self.mode.startswith("upsample"):
            return self._spatial_conv(self.resample[0](x), 1, 1)
        x = self._spatial_conv(F.pad(x, (0, 1, 0, 1)), 2, 0)
        if self.mode == "downsample3d":
            if cache.first_visit(self):
                cache.tails[self] = x[:, :, -1:].clone()
            else:
                tail = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([cache.tails[self], x], dim=2))
                cache.tails[self] = tail
        return x


def average_down(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """2.2 encoder shortcut: fold (t, h, w) sub-positions into channels, then average channel groups to out_dim.

    Time is first zero-padded in front to a multiple of factor_t. [B, C, T, H, W] -> [B, out_dim, T/ft, H/fs, W/fs].
    """
    x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % factor_t, 0))
    B, C, T, H, W = x.shape
    x = x.view(B, C, T // factor_t, factor_t, H // factor_s, factor_s, W // factor_s, factor_s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, ft, fs_h, fs_w, T', H', W']
    group = C * factor_t * factor_s * factor_s // out_dim
    return x.reshape(B, out_dim, group, T // factor_t, H // factor_s, W // factor_s).mean(dim=2)


def duplicate_up(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> torch.Tensor:
    """2.2 decoder shortcut: repeat channels, then unfold them into (t, h, w) sub-positions.

    [B, C, T, H, W] -> [B, out_dim, T*ft, H*fs, W*fs]; the first chunk drops its first ft-1 frames (causal start).
    """
    B, C, T, H, W = x.shape
    x = x.repeat_interleave(out_dim * factor_t * factor_s * factor_s // C, dim=1)
    x = x.view(B, out_dim, factor_t, factor_s, factor_s, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(B, out_dim, T * factor_t, H * factor_s, W * factor_s)
    return x[:, :, factor_t - 1:] if first_chunk else x


class DownStage(nn.Module):
    """2.2 encoder stage: residual blocks and a downsampling in `downsamples`, plus the `average_down` shortcut."""

    def __init__(self, blocks: list[nn.Module], out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.downsamples = nn.Sequential(*blocks)
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        shortcut = average_down(x, self.out_dim, self.factor_t, self.factor_s)
        for block in self.downsamples:
            x = block(x, cache)
        return x.add_(shortcut)


class UpStage(nn.Module):
    """2.2 decoder stage: residual blocks and an upsampling in `upsamples`, plus the `duplicate_up` shortcut."""

    def __init__(self, blocks: list[nn.Module], out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.upsamples = nn.Sequential(*blocks)
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        first = cache.first_visit(self)
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        if self.factor_s == 1:  # the last stage has no resampling and no shortcut
            return y
        return y.add_(duplicate_up(x, self.out_dim, self.factor_t, self.factor_s, first))


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    norm, _, conv = head
    return norm_silu_conv(norm, conv, x, cache)


class Encoder(nn.Module):
    """Pixels (unshuffled for 2.2) [B, 3p^2, t, H, W] -> [B, 2*z_dim, t', H/8, W/8] for one causal chunk."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = cfg.encoder_dims
        self.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            down = i < len(cfg.dim_mult) - 1
            temporal = down and cfg.temporal_downsample[i]
            blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(cfg.num_res_blocks)]
            if down:
                blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
            if cfg.residual_shortcuts:
                layers.append(DownStage(blocks, out_dim, 2 if temporal else 1, 2 if down else 1))
            else:
                layers.extend(blocks)
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        return _run_head(self.head, x, cache)


class Decoder(nn.Module):
    """Latent [B, z_dim, 1, h, w] -> pixels (shuffled for 2.2) [B, 3p^2, t, 8h, 8w] for one causal chunk."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = cfg.decoder_dims
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            up = i < len(cfg.dim_mult) - 1
            temporal = up and temporal_upsample[i]
            if i > 0 and not cfg.residual_shortcuts:
                in_dim //= 2  # the 2.1 upsampling conv halved the width
            blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(cfg.num_res_blocks + 1)]
            if up:
                mode = "upsample3d" if temporal else "upsample2d"
                blocks.append(Resample(out_dim, mode, out_dim if cfg.residual_shortcuts else out_dim // 2))
            if cfg.residual_shortcuts:
                layers.append(UpStage(blocks, out_dim, 2 if temporal else 1, 2 if up else 1))
            else:
                layers.extend(blocks)
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], cfg.in_channels)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        for layer in self.upsamples:
            x = layer(x, cache)
        return _run_head(self.head, x, cache)


@functools.cache
def footprint(config: VAEConfig, encode: bool) -> tuple[float, float]:
    """(cached values, widest tensor) per latent cell of one chunk after the first, read off the encoder's or
    decoder's own modules: they run on the meta device (no memory, no compute) for a 4x4-cell tile, and the causal
    cache they fill and the largest tensor any module takes or returns are measured.

    The working memory of a chunk is the cache plus a few tensors as wide as the widest (`sora.vae_tiling`).
    """
    side = 4
    with torch.device("meta"):
        net = Encoder(config) if encode else Decoder(config)
    cache, widest, measuring = CausalCache(), [0], [False]

    def measure(module, args, output):
        if measuring[0]:
            widest[0] = max([widest[0]] + [t.numel() for t in (*args, output) if isinstance(t, torch.Tensor)])
    hooks = [m.register_forward_hook(measure) for m in net.modules()]
    s, p = config.spatial_factor, config.patch_size
    try:
        with torch.no_grad():
            for frames in (1, config.temporal_factor):  # the first chunk is one frame; the later ones are larger
                measuring[0] = frames > 1
                if encode:
                    net(torch.empty(1, config.in_channels, frames, side * s // p, side * s // p, device="meta"), cache)
                else:
                    net(torch.empty(1, config.z_dim, 1, side, side, device="meta"), cache)
    finally:
        for hook in hooks:
            hook.remove()
    cached = sum(t.numel() for t in cache.tails.values())
    return cached / side**2, widest[0] / side**2


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, C*p*p, F, H/p, W/p]; channel c*p*p + r*p + q holds sub-row q, sub-column r."""
    if p == 1:
        return x
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # [B, C, r, q, T, h, w]
    return x.reshape(B, C * p * p, T, H // p, W // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, C*p*p, F, h, w] -> [B, C, F, h*p, w*p]."""
    if p == 1:
        return x
    B, Cpp, T, h, w = x.shape
    x = x.view(B, Cpp // (p * p), p, p, T, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # [B, C, T, h, q, w, r]
    return x.reshape(B, Cpp // (p * p), T, h * p, w * p)


# --------------------------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------------------------

class WanVAE(nn.Module):
    """The Wan video VAE with chunked, tiled `encode` and `decode` (see the module docstring).

    Keys: `encoder.*`, `conv1` (mu / log-variance), `conv2` (before the decoder), `decoder.*`, as in the original.
    Weights may be float32, bfloat16 or float16; the computation runs in the weights' dtype and results are float32.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # ---- input checks ----

    def check_video(self, video: torch.Tensor) -> None:
        """Raise InputError unless `video` is [B, 3, F, H, W] with F = 1 + k*temporal_factor and H, W multiples of
        the spatial factor."""
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != 3:
            hint = " (that looks like ComfyUI's IMAGE layout [frames, H, W, 3]; move channels first and add a batch)" \
                if video.ndim == 4 and video.shape[-1] == 3 else ""
            raise InputError(f"a video must be [batch, 3, frames, height, width] in -1..1; got shape "
                             f"{list(video.shape)}{hint}")
        _check_frames(video.shape[2], cfg.temporal_factor)
        for name, size in (("height", video.shape[3]), ("width", video.shape[4])):
            s = cfg.spatial_factor
            if size % s or size == 0:
                below, above = size // s * s, (size // s + 1) * s
                nearest = f"{below} or {above}" if below else f"{above}"
                raise InputError(f"video {name} {size} is not a multiple of {s} (this VAE's compression); "
                                 f"use {nearest}")

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise InputError unless `latent` is [B, z_dim, T, h, w] with T, h, w >= 1."""
        z = self.config.z_dim
        if latent.ndim != 5:
            raise InputError(f"a latent must be [batch, {z}, latent_frames, height, width]; "
                             f"got shape {list(latent.shape)}")
        if latent.shape[1] != z:
            raise InputError(f"the latent has {latent.shape[1]} channels but this VAE decodes {z}-channel latents; "
                             "use the VAE that belongs to the model that made the latent (Wan 2.1: 16, Wan 2.2 "
                             "TI2V-5B: 48)")
        if min(latent.shape[2:]) < 1:
            raise InputError(f"the latent is empty: shape {list(latent.shape)}")

    # ---- tiling ----

    def working_bytes(self, height: int, width: int, *, batch: int = 1, encode: bool = False) -> int:
        """Estimated peak working memory, in bytes, of one chunk of a `height` x `width` (latent cells) tile."""
        cached, widest = footprint(self.config, encode)
        return vae_tiling.estimate_working_bytes(cached, widest, height, width, batch=batch, itemsize=self.conv2.weight
                                                 .element_size(), copies=vae_tiling.ACTIVATION_COPIES[
                                                     encode, self.config.residual_shortcuts])

    def plan_tiling(self, height: int, width: int, memory_budget: int | None, *, batch: int = 1,
                    encode: bool = False) -> Tiling | None:
        """The largest tiling of a `height` x `width` latent whose working memory fits `memory_budget` bytes.

        None when the whole frame fits (or no budget is given). See `sora.vae_tiling.plan`.
        """
        if memory_budget is None:
            return None
        return vae_tiling.plan(height, width, memory_budget,
                               lambda h, w: self.working_bytes(h, w, batch=batch, encode=encode))

    def _tiles(self, height: int, width: int, tiling: Tiling | None, memory_budget: int | None, batch: int,
               encode: bool) -> list[vae_tiling.Tile]:
        if tiling is not None and memory_budget is not None:
            raise InputError("give either a tiling or a memory budget, not both")
        if tiling is None:
            tiling = self.plan_tiling(height, width, memory_budget, batch=batch, encode=encode)
        return vae_tiling.tiles(height, width, tiling)

    # ---- encode / decode ----

    def encode(self, video: torch.Tensor, *, tiling: Tiling | None = None, memory_budget: int | None = None,
               callback: ProgressCallback | None = None) -> torch.Tensor:
        """Video [B, 3, F, H, W] in -1..1 -> raw latent mu [B, z_dim, T, H/s, W/s], float32, T = (F-1)/4 + 1.

        Frames are encoded in causal chunks (1, 4, 4, ... frames), each tile of the frame on its own; `tiling` (in
        latent cells) or `memory_budget` (bytes of working memory) split the frame, neither: one tile. The result is
        on the video's device; only one chunk at a time lives on the VAE's device. `callback(done, total)` is called
        after every chunk and may raise `sora.errors.Interrupted`.
        """
        self.check_video(video)
        cfg = self.config
        B, _, frames, H, W = video.shape
        s, p, z = cfg.spatial_factor, cfg.patch_size, cfg.z_dim
        T = (frames - 1) // cfg.temporal_factor + 1
        tiles = self._tiles(H // s, W // s, tiling, memory_budget, B, encode=True)
        out = torch.zeros(B, z, T, H // s, W // s, dtype=torch.float32, device=video.device)
        # only mu is needed: the first z_dim output channels of the 1x1x1 conv1
        mu_weight, mu_bias = self.conv1.weight[:z], self.conv1.bias[:z]
        with torch.no_grad():
            for n, tile in enumerate(tiles):
                cache = CausalCache()
                for t in range(T):
                    f0, f1 = (0, 1) if t == 0 else (1 + (t - 1) * cfg.temporal_factor, 1 + t * cfg.temporal_factor)
                    rows, cols = tile.region(s)
                    x = patchify(video[:, :, f0:f1, rows, cols].to(self.device, self.dtype), p)
                    mu = conv3d(self.encoder(x, cache), mu_weight, mu_bias)  # [B, z, 1, h, w]
                    tile.write(out[:, :, t:t + 1], mu.float())
                    if callback is not None:
                        callback(n * T + t + 1, len(tiles) * T)
        vae_tiling.normalize_blend(out, tiles)
        return out

    def decode(self, latent: torch.Tensor, *, tiling: Tiling | None = None, memory_budget: int | None = None,
               callback: ProgressCallback | None = None) -> torch.Tensor:
        """Raw latent [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T-1), h*s, w*s] clamped to -1..1, float32.

        One latent frame at a time, each tile of the frame on its own (tiles are clamped, then blended); `tiling` (in
        latent cells) or `memory_budget` (bytes of working memory) split the frame, neither: one tile. The result is
        on the latent's device; only one chunk at a time lives on the VAE's device. `callback(done, total)` is called
        after every chunk and may raise `sora.errors.Interrupted`.
        """
        self.check_latent(latent)
        cfg = self.config
        B, _, T, h, w = latent.shape
        s, tf = cfg.spatial_factor, cfg.temporal_factor
        tiles = self._tiles(h, w, tiling, memory_budget, B, encode=False)
        out = torch.zeros(B, 3, 1 + tf * (T - 1), h * s, w * s, dtype=torch.float32, device=latent.device)
        with torch.no_grad():
            for n, tile in enumerate(tiles):
                cache = CausalCache()
                for t in range(T):
                    x = latent[:, :, t:t + 1, tile.rows, tile.cols].to(self.device, self.dtype)
                    frames = unpatchify(self.decoder(self.conv2(x), cache), cfg.patch_size)
                    f0 = 0 if t == 0 else 1 + (t - 1) * tf
                    tile.write(out[:, :, f0:f0 + frames.shape[2]], frames.float().clamp_(-1.0, 1.0), scale=s)
                    if callback is not None:
                        callback(n * T + t + 1, len(tiles) * T)
        vae_tiling.normalize_blend(out, tiles, scale=s)
        return out


# --------------------------------------------------------------------------------------------------------------------
# Under the memory manager
# --------------------------------------------------------------------------------------------------------------------

def decode_video(vae: WanVAE, latent: torch.Tensor, *, manager: memory.MemoryManager | None = None,
                 callback: ProgressCallback | None = None) -> torch.Tensor:
    """`vae.decode(latent)` with the VAE placed by the memory manager and its tile size chosen from the budget
    (`budget_for("vae_decode")`); an out-of-memory error retries with half the working memory (smaller tiles)."""
    vae.check_latent(latent)
    B, _, _, h, w = latent.shape
    return _managed(vae, "vae_decode", vae.decode, latent, h, w, B, False, manager, callback)


def encode_video(vae: WanVAE, video: torch.Tensor, *, manager: memory.MemoryManager | None = None,
                 callback: ProgressCallback | None = None) -> torch.Tensor:
    """`vae.encode(video)` placed and tiled like `decode_video` (`budget_for("vae_encode")`)."""
    vae.check_video(video)
    s = vae.config.spatial_factor
    B, _, _, H, W = video.shape
    return _managed(vae, "vae_encode", vae.encode, video, H // s, W // s, B, True, manager, callback)


def _managed(vae: WanVAE, purpose: str, run: Callable, data: torch.Tensor, h: int, w: int, batch: int, encode: bool,
             manager: memory.MemoryManager | None, callback) -> torch.Tensor:
    manager = manager or memory.get_manager()
    whole = vae.working_bytes(h, w, batch=batch, encode=encode)
    tiles = vae.plan_tiling(h, w, 0, batch=batch, encode=encode)  # the smallest tiles the VAE would use
    smallest = vae.working_bytes(tiles.height, tiles.width, batch=batch, encode=encode)
    with manager.use(vae, activation_bytes=smallest) as placement:
        def step() -> torch.Tensor:
            budget = manager.budget_for(purpose, wanted=whole) if placement.device == manager.compute_device else None
            return run(data, memory_budget=budget, callback=callback)
        return manager.retry_on_oom(step, manager.smaller_work(purpose), what=purpose.replace("_", " "))


def _check_frames(frames: int, temporal_factor: int) -> None:
    if frames < 1:
        raise InputError(f"a video needs at least 1 frame, got {frames}")
    if (frames - 1) % temporal_factor:
        below = 1 + (frames - 1) // temporal_factor * temporal_factor
        raise InputError(f"{frames} frames do not fit the VAE's causal grid of 1 + {temporal_factor}k frames; "
                         f"use {below} or {below + temporal_factor}")


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------

ANCHOR = "decoder.middle.0.residual.0.gamma"  # every Wan VAE file has it (ComfyUI detects Wan VAEs by it)
DIFFUSERS_ANCHOR = "decoder.mid_block.resnets.0.norm1.gamma"
PREFIXES = ("vae.", "first_stage_model.", "model.vae.")


def load_vae(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> WanVAE:
    """Load a Wan 2.1 or 2.2 VAE from a file or shard index; which one, and its widths, come from the tensors.

    Layouts: the original keys (`Wan2.1_VAE.pth`, ComfyUI's `wan_2.1_vae.safetensors`), diffusers'
    `AutoencoderKLWan` keys, either under a `vae.` prefix (full ComfyUI checkpoints). `.pth` files load with
    `weights_only=True`. `dtype=None` keeps the stored float dtype (fp8 or other storage becomes float32).
    """
    state_dict = to_original_layout(load_state_dict(path), source=path)
    config = detect_vae_config(state_dict, source=path)
    if dtype is None:
        stored = state_dict["conv2.weight"].dtype
        dtype = stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    model = build(lambda: WanVAE(config), state_dict, what=f"Wan VAE ({describe_config(config)})", source=path)
    return model.to(device).eval().requires_grad_(False)


def describe_config(config: VAEConfig) -> str:
    version = "2.2" if config.residual_shortcuts else "2.1"
    return f"{version} layout, widths {config.base_dim}/{config.decoder_base_dim}, z_dim {config.z_dim}"


def to_original_layout(state_dict: StateDict, *, source: str | Path = "checkpoint") -> StateDict:
    """Strip a known prefix and convert diffusers' `AutoencoderKLWan` names to the original ones.

    Raises CheckpointError, saying what the file looks like, when it holds no Wan VAE.
    """
    for anchor in (ANCHOR, DIFFUSERS_ANCHOR):
        state_dict = strip_prefix(state_dict, PREFIXES, anchor)
    if DIFFUSERS_ANCHOR in state_dict:
        return _from_diffusers(state_dict)
    if ANCHOR not in state_dict:
        raise CheckpointError(f"{source} is not a Wan VAE: {describe(state_dict, 'Wan VAE')}. Pick the VAE file "
                              "(e.g. wan_2.1_vae.safetensors or Wan2.2_VAE.pth)")
    return state_dict


def detect_vae_config(state_dict: StateDict, *, source: str | Path = "checkpoint") -> VAEConfig:
    """The `VAEConfig` of a state dict in the original layout (see `to_original_layout`), read from its tensors.

    2.2 is recognised by its staged decoder keys (`decoder.upsamples.0.upsamples.*`); widths from conv shapes,
    the stage count and temporal flags from which resample and time_conv keys exist.
    """
    if ANCHOR not in state_dict:
        state_dict = to_original_layout(state_dict, source=source)
    residual = "decoder.upsamples.0.upsamples.0.residual.2.weight" in state_dict
    try:
        conv_in = state_dict["encoder.conv1.weight"]  # [base_dim, 3p^2, 3, 3, 3]
        z_dim = state_dict["conv2.weight"].shape[0]
        decoder_base = state_dict["decoder.head.2.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{source}: the Wan VAE tensor {e.args[0]!r} is missing; the file is incomplete") \
            from None
    base_dim = conv_in.shape[0]
    patch_size = round(math.sqrt(conv_in.shape[1] / 3))
    stages = _encoder_stages(state_dict, residual)
    if not stages or stages[0][0] == 0:
        raise CheckpointError(f"{source}: no encoder residual blocks found; the file is incomplete")
    num_res_blocks = stages[0][0]
    dim_mult = tuple(width // base_dim for _, width, _ in stages)
    temporal = tuple(t for _, _, t in stages[:-1])
    try:
        config = VAEConfig(base_dim=base_dim, decoder_base_dim=decoder_base // dim_mult[0], z_dim=z_dim,
                           dim_mult=dim_mult, num_res_blocks=num_res_blocks, temporal_downsample=temporal,
                           patch_size=patch_size, residual_shortcuts=residual)
    except InputError as e:
        raise CheckpointError(f"{source}: the tensors describe no valid Wan VAE ({e})") from None
    return config


def _encoder_stages(state_dict: StateDict, residual: bool) -> list[tuple[int, int, bool]]:
    """(residual blocks, output width, temporal downsampling) per encoder stage, from the encoder's keys."""
    stages, blocks, width = [], 0, 0
    index = 0
    while True:
        prefix = f"encoder.downsamples.{index}."
        if residual:  # 2.2: one module per stage, its layers under `.downsamples.K`
            if prefix + "downsamples.0.residual.2.weight" not in state_dict:
                return stages
            k = 0
            while f"{prefix}downsamples.{k}.residual.2.weight" in state_dict:
                width = state_dict[f"{prefix}downsamples.{k}.residual.2.weight"].shape[0]
                k += 1
            stages.append((k, width, f"{prefix}downsamples.{k}.time_conv.weight" in state_dict))
        else:  # 2.1: residual blocks and resamples in one flat list
            if prefix + "residual.2.weight" in state_dict:
                blocks += 1
                width = state_dict[prefix + "residual.2.weight"].shape[0]
            elif prefix + "resample.1.weight" in state_dict:
                stages.append((blocks, width, prefix + "time_conv.weight" in state_dict))
                blocks = 0
            else:
                if blocks:
                    stages.append((blocks, width, False))
                return stages
        index += 1


# diffusers' `AutoencoderKLWan` names -> original names (ARCH_FACTS §2.5)
_DIFFUSERS_FIXED = {"encoder.conv_in.": "encoder.conv1.", "decoder.conv_in.": "decoder.conv1.",
                    "quant_conv.": "conv1.", "post_quant_conv.": "conv2.",
                    "encoder.norm_out.": "encoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
                    "decoder.norm_out.": "decoder.head.0.", "decoder.conv_out.": "decoder.head.2."}
_DIFFUSERS_RESNET = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.",
                     "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}
_DIFFUSERS_MIDDLE = {"resnets.0.": "0.", "attentions.0.": "1.", "resnets.1.": "2."}


def _from_diffusers(state_dict: StateDict) -> StateDict:
    """Rename diffusers' keys to the original ones; block indices depend on the residual blocks per stage."""
    residual = any(k.startswith("encoder.down_blocks.0.resnets.") for k in state_dict)
    counts = {part: 1 + max((int(k.split(".")[4]) for k in state_dict
                             if k.startswith(f"{part}.{blocks}.0.resnets.")), default=-1)
              for part, blocks in (("encoder", "down_blocks"), ("decoder", "up_blocks"))}
    return {_original_name(k, residual, counts): v for k, v in state_dict.items()}


def _original_name(key: str, residual: bool, resnets_per_stage: dict[str, int]) -> str:
    for old, new in _DIFFUSERS_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    middle = re.fullmatch(r"(encoder|decoder)\.mid_block\.(.*)", key)
    if middle:
        part, rest = middle.groups()
        for old, new in _DIFFUSERS_MIDDLE.items():
            if rest.startswith(old):
                return f"{part}.middle.{new}{_resnet_part(rest[len(old):])}"
    staged = re.fullmatch(r"(encoder|decoder)\.(?:down_blocks|up_blocks)\.(\d+)\.(.*)", key)
    if not staged:
        return key
    part, stage, rest = staged[1], int(staged[2]), staged[3]
    plural = "downsamples" if part == "encoder" else "upsamples"
    if part == "encoder" and not residual:  # 2.1 encoder: one flat list with the same indices
        return f"encoder.downsamples.{stage}.{_resnet_part(rest)}"
    resnet = re.fullmatch(r"resnets\.(\d+)\.(.*)", rest)
    if resnet:
        layer, rest = int(resnet[1]), _resnet_part(resnet[2])
    else:  # the stage's resampling comes after its residual blocks
        layer, rest = resnets_per_stage[part], re.sub(r"^(downsampler|upsampler|upsamplers\.0)\.", "", rest)
    if residual:
        return f"{part}.{plural}.{stage}.{plural}.{layer}.{rest}"
    return f"decoder.upsamples.{stage * (resnets_per_stage['decoder'] + 1) + layer}.{rest}"


def _resnet_part(rest: str) -> str:
    for old, new in _DIFFUSERS_RESNET.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest
