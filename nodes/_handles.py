"""Our own socket types, and what the file name of a model tells.

Standard data travels in ComfyUI's standard types (LATENT, IMAGE, SIGMAS, CONDITIONING). Only the loaded models
have types of their own, so that no core node accepts them and breaks at run time:

- SORA_DIT: a `sora.handle.ModelHandle` (the shared, cached DiT and this branch's patches, wrappers and memory
  options);
- SORA_TEXT_ENCODER: a `sora.text.TextEncoder`;
- SORA_VAE: a `sora.vae.WanVAE`.
"""
from __future__ import annotations

import re

from ._sora import sora

DIT, TEXT_ENCODER, VAE = "SORA_DIT", "SORA_TEXT_ENCODER", "SORA_VAE"

# Wan 2.2 A14B's experts have the same tensors; only their file names tell them apart
# (wan2.2_t2v_high_noise_14B_fp16.safetensors, .../low_noise_model/...).
_HIGH, _LOW = re.compile(r"high[_ -]?noise", re.IGNORECASE), re.compile(r"low[_ -]?noise", re.IGNORECASE)


def expert_from_name(name: str) -> str:
    """The expert (`sora.handle.HIGH_NOISE` or `LOW_NOISE`) the file name (or its folder) says, else SINGLE."""
    if _HIGH.search(name):
        return sora.handle.HIGH_NOISE
    if _LOW.search(name):
        return sora.handle.LOW_NOISE
    return sora.handle.SINGLE
