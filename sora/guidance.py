"""Classifier-free guidance and the Wan 2.2 A14B two-expert hand-off.

CFG: `v = v_uncond + g·(v_cond − v_uncond)` (ARCH_FACTS §4.1). By default the conditional and unconditional
passes run as one forward on a doubled batch; `batched=False` runs them one after the other, which halves the
activation memory and gives the same result. Positive and negative contexts of different lengths are zero-padded
to the longer one: the Wan DiT zero-pads every context to `text_len` and uses no key mask, so the padding does
not change its output.

Two experts (ARCH_FACTS §4.9): the high-noise expert runs while `σ·1000 ≥ boundary_t` (875 for T2V, 900 for I2V),
the low-noise expert below; both continue the same solver state.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import InputError

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pad_context(context: torch.Tensor, length: int) -> torch.Tensor:
    """Zero rows appended to `context` [B, L, D] up to `length` rows."""
    B, L, D = context.shape
    if L == length:
        return context
    return torch.cat([context, context.new_zeros(B, length - L, D)], dim=1)


def _check_context(name: str, context: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise InputError(f"{name} context must be a tensor [B, L, D] (text embeddings), got {shape}")
    if context.shape[0] not in (1, batch):
        raise InputError(f"{name} context has batch {context.shape[0]} but the latent has batch {batch}; "
                         "give one context per latent or a single one for all")
    return context.expand(batch, -1, -1)


def guidance_scales(guidance: float | Sequence[float] | torch.Tensor, steps: int) -> list[float]:
    """One guidance scale per step: a single number for all steps, or exactly `steps` values."""
    if isinstance(guidance, (int, float)):
        return [float(guidance)] * steps
    scales = [float(g) for g in torch.as_tensor(guidance, dtype=torch.float64).flatten()]
    if len(scales) != steps:
        raise InputError(f"a per-step guidance needs one value per step: got {len(scales)} values for {steps} steps")
    return scales


class ClassifierFreeGuidance:
    """Guided velocity for one sampling run; the contexts are checked, broadcast and padded once.

    positive, negative: [B or 1, L, D] text embeddings (negative None: no guidance, every scale must be 1).
    batched: one forward on [cond; uncond] (default) or two forwards (less memory, same result).
    """

    def __init__(self, positive: torch.Tensor, negative: torch.Tensor | None, batch: int, batched: bool = True):
        positive = _check_context("positive", positive, batch)
        self.batched = batched
        self.positive = positive
        self.negative = None
        self.both = None  # [2B, L, D]: positive then negative, for the batched forward
        if negative is not None:
            negative = _check_context("negative", negative, batch)
            if negative.shape[2] != positive.shape[2]:
                raise InputError(f"positive and negative contexts differ in width ({positive.shape[2]} vs "
                                 f"{negative.shape[2]}); encode both prompts with the same text encoder")
            length = max(positive.shape[1], negative.shape[1])
            self.positive = pad_context(positive, length)
            self.negative = pad_context(negative, length)
            if batched:
                self.both = torch.cat([self.positive, self.negative])

    def to(self, device: torch.device) -> ClassifierFreeGuidance:
        self.positive = self.positive.to(device)
        if self.negative is not None:
            self.negative = self.negative.to(device)
        if self.both is not None:
            self.both = self.both.to(device)
        return self

    def velocity(self, model: Model, x: torch.Tensor, timestep: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided velocity at `x` [B, C, T, H, W] for `timestep` [B] or [B, T]; float32."""
        if scale == 1.0:
            return model(x, timestep, self.positive).float()
        if self.negative is None:
            raise InputError(f"guidance {scale} needs a negative conditioning; connect one (an empty prompt "
                             "works) or set guidance to 1.0")
        if self.batched:
            v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([timestep, timestep]), self.both).float().chunk(2)
        else:
            v_cond = model(x, timestep, self.positive).float()
            v_uncond = model(x, timestep, self.negative).float()
        return v_uncond + scale * (v_cond - v_uncond)


def is_high_noise_step(sigma: float, boundary_t: float) -> bool:
    """The reference test `t ≥ boundary_t` with t = σ·1000. The reference truncates t to an integer first; with an
    integer boundary that gives the same answer."""
    return sigma * 1000.0 >= boundary_t


def expert_step_counts(sigmas: torch.Tensor, boundary_t: float) -> tuple[int, int]:
    """(high-noise steps, low-noise steps) of a schedule; e.g. 40 steps, shift 12, boundary 875 → (26, 14)."""
    high = sum(is_high_noise_step(float(s), boundary_t) for s in sigmas[:-1])
    return high, len(sigmas) - 1 - high
