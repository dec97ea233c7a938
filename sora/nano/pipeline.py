"""Generating with the nano model from plain Python: prompts (or a first frame and prompts) -> latent -> video,
and extending a clip.

It makes the calls the nodes make (`load_dit`, `load_vae`, `load_minilm`, `sora.samplers.sample`,
`sora.conditioning.image_to_video`, `extend_forward` / `join`) at the nano defaults; the benchmark, the tests and
the training evaluation use it. The negative prompt is the empty one, as in the shipped nano workflow.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..conditioning import extend_forward, image_to_video, join
from ..dit import WanDiT, load_dit
from ..samplers import sample
from ..schedules import flow_sigmas
from ..text import TextEncoder, load_minilm
from ..vae import WanVAE, load_vae
from . import DEFAULTS, HEIGHT, WIDTH, dit_path, vae_path


@dataclass
class NanoPipeline:
    dit: WanDiT
    vae: WanVAE
    encoder: TextEncoder
    steps: int = DEFAULTS.steps
    shift: float = DEFAULTS.shift
    guidance: float = DEFAULTS.guidance

    @classmethod
    def load(cls, dit_file: str | Path | None = None, vae_file: str | Path | None = None) -> NanoPipeline:
        """The shipped model (or the given files), float32 on the CPU."""
        dit = load_dit(dit_file or dit_path(), compute_dtype=torch.float32)
        vae = load_vae(vae_file or vae_path(), dtype=torch.float32)
        return cls(dit=dit, vae=vae, encoder=load_minilm())

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> MiniLM token states [B, L, 384], zero past each prompt's length."""
        return self.encoder.encode(prompts)[0]

    @torch.inference_mode()
    def denoise(self, latent: torch.Tensor, prompts: list[str], seed: int,
                noise_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the raw latent [B, C, T, h, w] (zeros: text-to-video) for one prompt per batch row."""
        sigmas = flow_sigmas(self.steps, self.shift)
        return sample(self.dit, latent, sigmas, self.encode(prompts), self.encode([""]), guidance=self.guidance,
                      seed=seed, noise_mask=noise_mask)

    def text_to_latent(self, prompts: list[str], seed: int, frames: int = DEFAULTS.frames, height: int = HEIGHT,
                       width: int = WIDTH) -> torch.Tensor:
        """Text-to-video as a raw latent [B, C, (frames-1)/4 + 1, height/8, width/8]."""
        cfg = self.vae.config
        latent = torch.zeros(len(prompts), cfg.z_dim, (frames - 1) // cfg.temporal_factor + 1,
                             height // cfg.spatial_factor, width // cfg.spatial_factor)
        return self.denoise(latent, prompts, seed)

    @torch.inference_mode()
    def image_to_latent(self, image: torch.Tensor, prompts: list[str], seed: int,
                        frames: int = DEFAULTS.frames) -> torch.Tensor:
        """Image-to-video: `image` [B, 3, 1, H, W] in -1..1 becomes the first frame of a raw latent clip of
        `frames` pixel frames; the caption says how it moves."""
        latent_frames = (frames - 1) // self.vae.config.temporal_factor + 1
        condition = image_to_video(self.vae.encode(image), latent_frames)
        return self.denoise(condition["samples"], prompts, seed, condition["noise_mask"])

    def extend_latent(self, clip: torch.Tensor, prompts: list[str], seed: int, overlap: int = 2,
                      new_frames: int = 4) -> torch.Tensor:
        """Continue a raw latent clip by `new_frames` latent frames, conditioned on its last `overlap`; returns
        the joined clip [B, C, T + new_frames, h, w]."""
        condition = extend_forward(clip, overlap, new_frames)
        part = self.denoise(condition["samples"], prompts, seed, condition["noise_mask"])
        return join([clip, part], overlap)

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent -> video [B, 3, F, H, W] in -1..1."""
        return self.vae.decode(latent)
