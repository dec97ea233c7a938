"""Latent previews: a cheap look at a latent without the VAE.

Each latent family carries a small linear map from its normalised channels to RGB (`LatentFormat.rgb_factors`,
`rgb_bias`; the Wan values are ComfyUI's). One latent cell becomes one preview pixel, so a preview is
`spatial` (8 or 16) times smaller than the video. The sampler's callback hands out raw latents; this module
normalises them first.
"""
from __future__ import annotations

import torch

from .errors import InputError
from .latent_formats import LatentFormat, format_of


def latent_to_rgb(latent: torch.Tensor, fmt: LatentFormat | str) -> torch.Tensor:
    """Raw latent [B, C, T, H, W] -> preview frames [B, T, H, W, 3], float32 in 0..1 (ComfyUI's IMAGE layout)."""
    if isinstance(fmt, str):
        fmt = format_of(fmt)
    if not fmt.rgb_factors:
        raise InputError(f"the {fmt.name} latent format has no preview colours; register rgb_factors for it")
    if latent.ndim != 5 or latent.shape[1] != fmt.channels:
        raise InputError(f"a {fmt.name} preview needs a latent [B, {fmt.channels}, T, H, W], got {tuple(latent.shape)}")
    x = fmt.normalize(latent.float())
    factors = torch.tensor(fmt.rgb_factors, dtype=x.dtype, device=x.device)  # [C, 3]
    bias = torch.tensor(fmt.rgb_bias, dtype=x.dtype, device=x.device)
    rgb = torch.einsum("bcthw,ck->bthwk", x, factors) + bias  # in about [-1, 1]
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def preview_frame(latent: torch.Tensor, fmt: LatentFormat | str, frame: int = 0) -> torch.Tensor:
    """One preview image [H, W, 3] in 0..1: latent frame `frame` of the first batch item (for progress bars)."""
    frames = latent.shape[2] if latent.ndim == 5 else 0
    if not -frames <= frame < frames:
        raise InputError(f"preview frame {frame} is outside the latent's {frames} frames")
    return latent_to_rgb(latent[:1, :, [frame]], fmt)[0, 0]
