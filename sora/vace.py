"""VACE conditioning: control videos, masks and reference images as the 96-channel context of a Wan VACE model.

Facts (ECOSYSTEM_FACTS §6; Wan `vace.py`, ComfyUI `WanVaceToVideo` / `WAN21_Vace.extra_conds`):

- The control video `v` (pixels in -1..1, 0 is neutral gray; frames not given are gray) and the mask `m` (1 where
  the model generates, 0 where it keeps what the video shows) make two videos, inactive = v·(1 − m) and
  reactive = v·m, each VAE-encoded: 16 + 16 latent channels.
- The pixel mask [F, H, W] becomes 64 channels: an 8x8 pixel-unshuffle, [8·8, F, H/8, W/8], then resized in time
  to the latent frames with `nearest-exact`.
- A reference image is VAE-encoded as one frame and completed with 16 channels that are 0 after normalisation;
  reference frames go in front of the video along time, with mask 0, and the noise latent gets as many extra
  frames, which are dropped after sampling.
- The context is cat(normalised 32 latent channels, 64 mask channels) = 96. A model with a VACE branch and no
  input gets ComfyUI's default: zero raw latents and an all-ones mask.

CONDITIONING carries it as ComfyUI core does: `vace_frames` (raw latents [B, 32, T, h, w]), `vace_mask`
([1, 64, T, h, w]) and `vace_strength`, lists appended by each VACE node, so several inputs stack.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conditioning import prepare_mask
from .errors import InputError
from .latent_formats import LatentFormat

MASK_CELL = 8  # pixels per mask cell side: the Wan 2.1 VAE's spatial compression


@dataclass(frozen=True)
class VaceInput:
    """One VACE input as the conditioning stores it: raw latents [B, 32, T, h, w] (inactive then reactive, or a
    reference frame and zeros), the mask channels [1, 64, T, h, w] (1 = generate) and the strength."""
    frames: torch.Tensor
    mask: torch.Tensor
    strength: float


def control_videos(video: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inactive and reactive videos: video [1, 3, F, H, W] in -1..1, mask [F, H, W] in 0..1 (1 = generate).
    Not binarised (as ComfyUI; Wan thresholds at 0.5, the same for a 0/1 mask)."""
    m = mask.to(video.dtype)[None, None]  # [1, 1, F, H, W]
    return video * (1 - m), video * m


def mask_channels(mask: torch.Tensor, latent_frames: int, cell: int = MASK_CELL) -> torch.Tensor:
    """Pixel mask [F, H, W] -> [1, cell², T, H/cell, W/cell]: channel 8·i + j holds pixel (i, j) of each cell,
    resized in time to `latent_frames` with nearest-exact."""
    frames, height, width = mask.shape
    if height % cell or width % cell:
        raise InputError(f"the mask is {width}x{height}; VACE needs a multiple of {cell} pixels")
    h, w = height // cell, width // cell
    cells = mask.float().view(frames, h, cell, w, cell).permute(2, 4, 0, 1, 3).reshape(cell * cell, frames, h, w)
    return F.interpolate(cells[None], size=(latent_frames, h, w), mode="nearest-exact")


def reference_frames(latents: torch.Tensor, fmt: LatentFormat) -> torch.Tensor:
    """Encoded reference images [1, 16, n, h, w] (one latent frame each) -> [1, 32, n, h, w]: completed with raw
    values that normalise to 0 (the format's mean)."""
    return torch.cat([latents, fmt.denormalize(torch.zeros_like(latents))], dim=1)


def with_references(frames: torch.Tensor, mask: torch.Tensor, references: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put reference frames [1, 32, n, h, w] in front of the video's latents [1, 32, T, h, w] and n zero frames
    in front of its mask [1, 64, T, h, w]."""
    if references is None:
        return frames, mask
    n = references.shape[2]
    return (torch.cat([references.to(frames), frames], dim=2),
            torch.cat([mask.new_zeros(*mask.shape[:2], n, *mask.shape[3:]), mask], dim=2))


def known_frames(samples: torch.Tensor, noise_mask: torch.Tensor | None, gray: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame condition (samples [1, 16, T, h, w] with known frames in place, noise_mask [.., 1, T, .., ..], 1 =
    generate) as VACE latents and mask: inactive = the known latents where kept and the gray video's elsewhere,
    reactive = the gray video's, mask = the noise mask on every cell. gray: the raw latent of an all-gray video of
    the same size [1, 16, T, h, w].

    This is the reference construction in latent space: the known frames' latents stand for the encoded kept
    frames (they were encoded inside a longer clip, so the causal VAE's first-frame rule is not repeated here).
    """
    T, h, w = samples.shape[2:]
    if noise_mask is None:
        keep = torch.zeros(1, 1, T, 1, 1)
    else:
        keep = 1 - prepare_mask(noise_mask, samples[:1].shape)[:1].float()  # [1, 1, T, h, w], 1 = kept
    inactive = samples[:1].float() * keep + gray.float() * (1 - keep)
    mask = (1 - keep).expand(1, MASK_CELL * MASK_CELL, T, h, w)
    return torch.cat([inactive, gray.float()], dim=1), mask.contiguous()


def context(entry: VaceInput, fmt: LatentFormat) -> torch.Tensor:
    """The 96-channel context the model reads: each 16-channel chunk of the raw latents normalised, then the
    mask; [B, 96, T, h, w]."""
    frames = entry.frames.float()
    c = fmt.channels
    chunks = [fmt.normalize(frames[:, i:i + c]) for i in range(0, frames.shape[1], c)]
    mask = entry.mask.float().to(frames.device).expand(frames.shape[0], -1, -1, -1, -1)
    return torch.cat([*chunks, mask], dim=1)


def default_input(shape: torch.Size) -> VaceInput:
    """What a VACE model reads without inputs (ComfyUI's default): zero raw latents, mask all ones. shape: the
    noise latent's [B, 16, T, h, w]."""
    B, C, T, h, w = shape
    return VaceInput(torch.zeros(1, 2 * C, T, h, w), torch.ones(1, MASK_CELL * MASK_CELL, T, h, w), 1.0)


def from_conditioning(cond: list) -> list[VaceInput]:
    """The VACE inputs of the first CONDITIONING entry that carries any (core's lists `vace_frames`, `vace_mask`,
    `vace_strength`), in order; [] when none does."""
    for entry in cond if isinstance(cond, (list, tuple)) else ():
        extras = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if not isinstance(extras, dict) or "vace_frames" not in extras:
            continue
        frames = list(extras["vace_frames"])
        masks = list(extras.get("vace_mask") or [None] * len(frames))
        strengths = list(extras.get("vace_strength") or [1.0] * len(frames))
        if not len(frames) == len(masks) == len(strengths):
            raise InputError(f"the CONDITIONING has {len(frames)} vace_frames, {len(masks)} vace_mask and "
                             f"{len(strengths)} vace_strength entries; each VACE node adds one of each")
        inputs = []
        for n, (f, m, s) in enumerate(zip(frames, masks, strengths)):
            if not isinstance(f, torch.Tensor) or f.ndim != 5:
                raise InputError(f"vace_frames[{n}] must be a latent [B, 32, T, h, w]")
            if m is None:
                m = torch.ones(1, MASK_CELL * MASK_CELL, *f.shape[2:])
            if not isinstance(m, torch.Tensor) or m.ndim != 5 or m.shape[2:] != f.shape[2:]:
                raise InputError(f"vace_mask[{n}] does not fit vace_frames[{n}] {list(f.shape)}")
            inputs.append(VaceInput(f, m, float(s)))
        return inputs
    return []


def with_input(cond: list, entry: VaceInput) -> list:
    """A new CONDITIONING whose entries carry one more VACE input (appended, as core's WanVaceToVideo does)."""
    out = []
    for emb, extras in cond:
        added = {key: list(extras.get(key, [])) + [value] for key, value in
                 (("vace_frames", entry.frames), ("vace_mask", entry.mask), ("vace_strength", entry.strength))}
        out.append([emb, {**extras, **added}])
    return out


def drop_reference_frames(latent: dict) -> dict:
    """A sampled LATENT without the reference frames Sora VACE Encode put in front (its `reference_frames`
    count), and without that count; other latents as they are."""
    n = latent.get("reference_frames", 0)
    if not n:
        return latent
    out = {key: value for key, value in latent.items() if key != "reference_frames"}
    out["samples"] = latent["samples"][:, :, n:]
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 5 and mask.shape[2] > 1:
        out["noise_mask"] = mask[:, :, n:]
    return out
