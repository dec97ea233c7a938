"""What our own socket types carry between nodes.

Standard data travels in ComfyUI's standard types (LATENT, IMAGE, SIGMAS, CONDITIONING). Only the loaded models
have types of their own, so that no core node accepts them and breaks at run time:

- SORA_DIT: a `DiffusionModel`, the loaded `sora.dit.WanDiT` with what the file name and loader options say;
- SORA_TEXT_ENCODER: a `sora.text.TextEncoder`;
- SORA_VAE: a `sora.vae.WanVAE`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ._sora import sora

DIT, TEXT_ENCODER, VAE = "SORA_DIT", "SORA_TEXT_ENCODER", "SORA_VAE"

SINGLE, HIGH_NOISE, LOW_NOISE = "single model", "high noise", "low noise"
EXPERTS = (SINGLE, HIGH_NOISE, LOW_NOISE)
# Wan 2.2 A14B's experts have the same tensors; only their file names tell them apart
# (wan2.2_t2v_high_noise_14B_fp16.safetensors, .../low_noise_model/...).
_EXPERT_IN_NAME = {HIGH_NOISE: re.compile(r"high[_ -]?noise", re.IGNORECASE),
                   LOW_NOISE: re.compile(r"low[_ -]?noise", re.IGNORECASE)}


def expert_from_name(name: str) -> str:
    """HIGH_NOISE or LOW_NOISE when the file name (or its folder) says so, else SINGLE."""
    for expert, pattern in _EXPERT_IN_NAME.items():
        if pattern.search(name):
            return expert
    return SINGLE


@dataclass(frozen=True)
class DiffusionModel:
    """A loaded DiT and what the nodes need to know about it.

    name: the file name (or "nano (embedded)"); expert: SINGLE, HIGH_NOISE or LOW_NOISE;
    blocks_resident, budget_bytes: Sora Memory Options' overrides (None: the memory manager decides).
    """
    dit: object  # sora.dit.WanDiT
    name: str
    expert: str = SINGLE
    blocks_resident: int | None = None
    budget_bytes: int | None = None

    @property
    def config(self):
        return self.dit.config

    @property
    def latent_format(self):
        """The model's `sora.latent_formats.LatentFormat` (channels, compression, statistics)."""
        return sora.latent_formats.FORMATS[self.config.latent_format]

    @property
    def task(self) -> str:
        """The key of the model's reference settings in `sora.schedules.DEFAULTS`."""
        config = self.config
        if config.latent_format == "nano":
            return "nano"
        if config.model_type == "ti2v":
            return "wan22_ti2v_5b"
        if config.model_type == "i2v":
            return "wan22_i2v_a14b"
        return "wan21_t2v" if self.expert == SINGLE else "wan22_t2v_a14b"

    def defaults(self):
        """The reference `sora.schedules.TaskDefaults` of this model, or None when none are registered."""
        return sora.schedules.DEFAULTS.get(self.task)
