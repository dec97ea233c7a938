"""Noise schedules for flow matching: the `SIGMAS` a sampler walks from noise (σ = 1) to data (σ = 0).

A schedule is ComfyUI's `SIGMAS`: a 1-D float32 tensor, strictly decreasing, one entry per step plus a final 0,
so core sigma nodes (SplitSigmas, FlipSigmas, ManualSigmas, SplitSigmasDenoise) work on it unchanged. The DiT
sees `t = σ·1000`.

The Wan reference has two grids (ARCH_FACTS §4.2), both bent towards high noise by the timestep shift
`σ' = s·σ / (1 + (s − 1)·σ)`:

- "wan_unipc" (the reference default): `linspace(0.999, 0, steps + 1)[:steps]`, shifted; σ0 is just below 1.
  diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True)` builds the same grid.
- "wan_dpm": `linspace(1, 0, steps + 1)[:steps]`, shifted; σ0 is exactly 1.
- "linear": `1 − i/steps`, no shift (the plain rectified-flow grid; "wan_dpm" with shift 1).
- "distill": the grid few-step distilled Wan models were trained on (lightx2v step/CFG distill, Wan 2.2
  Lightning, ECOSYSTEM_FACTS §2): timesteps `1000·(1 − i/steps)`, shifted, with shift 5 unless one is given
  (`DISTILL_SHIFT`). Four steps give σ = 1, 0.9375, 0.8333, 0.625, the published list; run it with guidance 1
  and the lcm sampler (lightx2v Wan 2.1) or euler (Wan 2.2 Lightning).

diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True)` uses a third grid, `linspace(1, 1/1000, steps + 1)`,
shifted, with σ0 nudged to 1 − 1e-6; pass it through `custom_sigmas` if you need it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError

SCHEDULES = ("wan_unipc", "wan_dpm", "linear", "distill")
DISTILL_SHIFT = 5.0  # the shift of the published distillation timesteps


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift `s·σ / (1 + (s − 1)·σ)`; s > 1 spends more steps at high noise."""
    if not shift > 0:
        raise InputError(f"shift must be > 0, got {shift}; the Wan defaults are 5.0 (t2v) and 3.0 to 16.0 elsewhere")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _linspace(start: float, stop: float, count: int) -> torch.Tensor:
    # Written as start + i·step in float64 (numpy's formula), so the grid equals the reference bit for bit.
    step = (stop - start) / (count - 1)
    grid = torch.arange(count, dtype=torch.float64) * step + start
    grid[-1] = stop
    return grid


def flow_sigmas(steps: int, shift: float = 5.0, schedule: str = "wan_unipc", denoise: float = 1.0) -> torch.Tensor:
    """The sigmas for `steps` steps of `schedule`, ending in 0; float32 `[steps + 1]`.

    `denoise` < 1 works like ComfyUI's BasicScheduler: the schedule is built for `int(steps / denoise)` steps and
    only its last `steps` steps are kept, so sampling starts from a partly noised input (video-to-video).
    `denoise` = 0 gives an empty schedule (nothing to do).
    """
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a whole number ≥ 1, got {steps!r}")
    if not 0.0 <= denoise <= 1.0:
        raise InputError(f"denoise must be in [0, 1], got {denoise}; 1 generates from pure noise")
    if denoise == 0.0:
        return torch.zeros(0, dtype=torch.float32)
    total = int(steps / denoise)
    if schedule == "wan_unipc":
        sigmas = shift_sigmas(_linspace(0.999, 0.0, total + 1)[:-1], shift)
    elif schedule in ("wan_dpm", "distill"):
        sigmas = shift_sigmas(_linspace(1.0, 0.0, total + 1)[:-1], shift)
    else:
        sigmas = _linspace(1.0, 0.0, total + 1)[:-1]
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)
    return sigmas[-(steps + 1):]


def linear_sigmas(steps: int) -> torch.Tensor:
    """Plain linear sigmas `1 − i/steps` with no shift, ending in 0."""
    return flow_sigmas(steps, 1.0, "linear")


def custom_sigmas(values: str | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Sigmas typed by hand ("1.0, 0.9, 0.5, 0") or computed elsewhere, checked; a final 0 is appended if missing."""
    if isinstance(values, str):
        try:
            numbers = [float(v) for v in values.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"custom sigmas must be numbers separated by commas or spaces, got {values!r}") from None
    else:
        numbers = [float(v) for v in torch.as_tensor(values, dtype=torch.float64).flatten()]
    if not numbers:
        raise InputError("custom sigmas are empty; give at least one value, e.g. '1.0, 0.5, 0'")
    if numbers[-1] != 0.0:
        numbers.append(0.0)
    return check_sigmas(torch.tensor(numbers, dtype=torch.float32))


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a `SIGMAS` tensor for flow sampling: 1-D, within [0, 1], strictly decreasing. Returns float32."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise InputError("sigmas must be a 1-D tensor (ComfyUI SIGMAS); build them with flow_sigmas or custom_sigmas")
    sigmas = sigmas.detach().to("cpu", torch.float32)
    if len(sigmas) == 0:
        return sigmas
    if sigmas.isnan().any() or sigmas.min() < 0 or sigmas.max() > 1:
        raise InputError(f"sigmas must lie in [0, 1] for flow matching (σ = 1 is pure noise), got {sigmas.tolist()}")
    if len(sigmas) > 1 and not (sigmas[1:] < sigmas[:-1]).all():
        raise InputError("sigmas must strictly decrease (noise to data); flipped or repeated sigmas cannot be "
                         f"sampled: {sigmas.tolist()}")
    return sigmas


def split_denoise(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """The low-noise tail for `denoise` ∈ [0, 1], as ComfyUI's SplitSigmasDenoise: the last round(steps·denoise)
    steps. Returns an empty schedule for denoise 0 (then a sampler returns its input unchanged)."""
    if not 0.0 <= denoise <= 1.0:
        raise InputError(f"denoise must be in [0, 1], got {denoise}")
    steps = max(len(sigmas) - 1, 0)
    kept = round(steps * denoise)
    if kept == 0:
        return sigmas[:0]
    return sigmas[-(kept + 1):]


# ---------------------------------------------------------------------------------------------------------------
# Reference defaults per model and task (ARCH_FACTS §4.3, §4.9)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskDefaults:
    """What the reference pipeline uses for one model and task."""
    steps: int
    shift: float
    guidance: float  # classifier-free guidance scale (the high-noise expert's for two-expert models)
    frames: int  # pixel frames, 1 + 4k
    fps: int
    low_noise_guidance: float | None = None  # two-expert models: the low-noise expert's scale
    boundary_t: float | None = None  # two-expert models: the high-noise expert runs while σ·1000 ≥ boundary_t
    negative_prefix: str = ""  # put in front of the base negative prompt


DEFAULTS: dict[str, TaskDefaults] = {
    "wan21_t2v": TaskDefaults(steps=50, shift=5.0, guidance=5.0, frames=81, fps=16),
    "wan21_i2v_720p": TaskDefaults(steps=40, shift=5.0, guidance=5.0, frames=81, fps=16, negative_prefix="镜头晃动，"),
    "wan21_i2v_480p": TaskDefaults(steps=40, shift=3.0, guidance=5.0, frames=81, fps=16, negative_prefix="镜头晃动，"),
    "wan21_flf2v": TaskDefaults(steps=50, shift=16.0, guidance=5.0, frames=81, fps=16,
                                negative_prefix="镜头切换，镜头晃动，"),
    "wan21_vace": TaskDefaults(steps=50, shift=16.0, guidance=5.0, frames=81, fps=16),
    "wan22_t2v_a14b": TaskDefaults(steps=40, shift=12.0, guidance=4.0, frames=81, fps=16,
                                   low_noise_guidance=3.0, boundary_t=875.0),
    "wan22_i2v_a14b": TaskDefaults(steps=40, shift=5.0, guidance=3.5, frames=81, fps=16,
                                   low_noise_guidance=3.5, boundary_t=900.0),
    "wan22_ti2v_5b": TaskDefaults(steps=50, shift=5.0, guidance=5.0, frames=121, fps=24),
    # the embedded model: what it was trained and measured with (sora/nano/weights/MODEL_CARD.md), 64x64
    "nano": TaskDefaults(steps=20, shift=3.0, guidance=5.0, frames=33, fps=16),
}
