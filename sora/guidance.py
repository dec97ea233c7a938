"""The guider: the velocity the solver gets at one step, from the expert of that step and its guidance passes.

Classifier-free guidance: `v = v_uncond + g·(v_cond − v_uncond)` (ARCH_FACTS §4.1). A side may hold several
prompts (ComfyUI's ConditioningCombine gives a CONDITIONING of several entries): each runs as its own pass and the
side's velocity is their weighted mean, `Σ wᵢ·vᵢ / Σ wᵢ`, as ComfyUI combines the entries of one CONDITIONING. By
default all passes run as one forward on a stacked batch; `batched=False` runs them one after the other, which
needs a fraction of the activation memory and gives the same result. Contexts of different lengths are
zero-padded to the longest: the Wan DiT zero-pads every context to `text_len` and uses no key mask, so the padding
does not change its output.

Cheaper guidance, both off by default: `cfg_end` runs guidance only on the first fraction of the steps (one forward
per step after it), and CFG-Zero* (Fan et al. 2025, arXiv 2503.18886) scales the unconditional velocity by the
optimised `s* = <v_cond, v_uncond> / |v_uncond|²` per sample and zeroes the velocity of the first steps (no
forward there at all).

Two experts (ARCH_FACTS §4.9): the high-noise expert runs while `σ·1000 ≥ boundary_t` (875 for T2V, 900 for I2V),
the low-noise expert below; both continue the same solver state.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .handle import ModelCall, ModelHandle, as_handle


@dataclass(frozen=True)
class Prompt:
    """One conditioning entry: text states [B or 1, L, D] and the entry's weight in its side's mean."""
    context: torch.Tensor
    weight: float = 1.0


def pad_context(context: torch.Tensor, length: int) -> torch.Tensor:
    """Zero rows appended to `context` [B, L, D] up to `length` rows."""
    B, L, D = context.shape
    if L == length:
        return context
    return torch.cat([context, context.new_zeros(B, length - L, D)], dim=1)


def prompts(side: str, given, batch: int) -> list[Prompt]:
    """The prompts of one side: a context tensor [B or 1, L, D] is one prompt of weight 1; a sequence of
    `Prompt`s is taken as it is. Each context is checked and broadcast to the latent's batch."""
    entries = [Prompt(given)] if isinstance(given, torch.Tensor) else list(given)
    if not entries:
        raise InputError(f"the {side} conditioning is empty; connect a text encode output")
    checked = []
    for i, entry in enumerate(entries):
        name = side if len(entries) == 1 else f"{side} entry {i}"
        context = entry.context if isinstance(entry, Prompt) else entry
        if not isinstance(context, torch.Tensor) or context.ndim != 3:
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise InputError(f"{name} context must be a tensor [B, L, D] (text embeddings), got {shape}")
        if context.shape[0] not in (1, batch):
            raise InputError(f"{name} context has batch {context.shape[0]} but the latent has batch {batch}; "
                             "give one context per latent or a single one for all")
        weight = entry.weight if isinstance(entry, Prompt) else 1.0
        if weight <= 0:
            raise InputError(f"{name} has weight {weight}; conditioning weights must be positive")
        checked.append(Prompt(context.float().expand(batch, -1, -1), float(weight)))
    return checked


def guidance_scales(guidance: float | Sequence[float] | torch.Tensor, steps: int) -> list[float]:
    """One guidance scale per step: a single number for all steps, or exactly `steps` values."""
    if isinstance(guidance, (int, float)):
        return [float(guidance)] * steps
    scales = [float(g) for g in torch.as_tensor(guidance, dtype=torch.float64).flatten()]
    if len(scales) != steps:
        raise InputError(f"a per-step guidance needs one value per step: got {len(scales)} values for {steps} steps")
    return scales


class ClassifierFreeGuidance:
    """Guided velocity for one sampling run; the prompts are checked, broadcast and padded once.

    positive, negative: a context [B or 1, L, D] or a list of `Prompt`s each (negative None: no guidance, every
        scale must be 1). batched: all passes in one forward (default) or one forward per pass. zero_star: combine
        with CFG-Zero*'s optimised scale, `s*·v_uncond + g·(v_cond − s*·v_uncond)`.
    """

    def __init__(self, positive, negative, batch: int, batched: bool = True, zero_star: bool = False):
        self.batched = batched
        self.zero_star = zero_star  # CFG-Zero*: the unconditional velocity scaled by `optimized_scale`
        self.batch = batch
        self.positive = prompts("positive", positive, batch)
        self.negative = None if negative is None else prompts("negative", negative, batch)
        widths = {p.context.shape[2] for p in self.positive + (self.negative or [])}
        if len(widths) > 1:
            raise InputError(f"the positive and negative contexts differ in width ({sorted(widths)}); encode all "
                             "prompts with the same text encoder")
        length = max(p.context.shape[1] for p in self.positive + (self.negative or []))
        pad = [Prompt(pad_context(p.context, length), p.weight) for p in self.positive + (self.negative or [])]
        self.positive, self.negative = pad[:len(self.positive)], (pad[len(self.positive):] or None)
        self.last: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (v_cond, v_uncond) of the last call

    def to(self, device: torch.device) -> ClassifierFreeGuidance:
        move = [Prompt(p.context.to(device), p.weight) for p in self.positive + (self.negative or [])]
        self.positive, self.negative = move[:len(self.positive)], (move[len(self.positive):] or None)
        return self

    def passes(self, scale: float) -> list[tuple[str, Prompt]]:
        """The (side, prompt) passes a step with guidance `scale` runs."""
        sides = [("cond", p) for p in self.positive]
        if scale != 1.0:
            if self.negative is None:
                raise InputError(f"guidance {scale} needs a negative conditioning; connect one (an empty prompt "
                                 "works) or set guidance to 1.0")
            sides += [("uncond", p) for p in self.negative]
        return sides

    def velocity(self, model: ModelHandle, x: torch.Tensor, timestep: torch.Tensor, scale: float,
                 call: ModelCall | None = None, **conditions) -> torch.Tensor:
        """The guided velocity at `x` [B, C, T, H, W] for `timestep` [B] or [B, T]; float32. `model` is a
        `ModelHandle` or a plain model (wrapped in a handle without patches); `conditions` (image tokens, VACE
        contexts: the same for every pass) go to it as keyword inputs."""
        model = as_handle(model)
        passes = self.passes(scale)
        names = tuple(side for side, _ in passes)
        if self.batched and len(passes) > 1:
            n = len(passes)
            context = torch.cat([p.context for _, p in passes])
            step = call if call is None else ModelCall(call.step, call.steps, call.sigma, names)
            outputs = model(torch.cat([x] * n), torch.cat([timestep] * n), context, step,
                            **_repeated(conditions, n)).float().chunk(n)
        else:
            outputs = [model(x, timestep, p.context, call if call is None else
                             ModelCall(call.step, call.steps, call.sigma, (side,)), **conditions).float()
                       for side, p in passes]
        v_cond = _weighted_mean([(o, p.weight) for o, (side, p) in zip(outputs, passes) if side == "cond"])
        if scale == 1.0:
            self.last = (v_cond, None)
            return v_cond
        v_uncond = _weighted_mean([(o, p.weight) for o, (side, p) in zip(outputs, passes) if side == "uncond"])
        self.last = (v_cond, v_uncond)
        if self.zero_star:
            v_uncond = optimized_scale(v_cond, v_uncond) * v_uncond
        return v_uncond + scale * (v_cond - v_uncond)


def optimized_scale(v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s s* = <v_cond, v_uncond> / (|v_uncond|² + 1e-8) per sample, shaped [B, 1, ...] to broadcast: the
    scale of v_uncond closest to v_cond in the least-squares sense."""
    B = v_cond.shape[0]
    dot = (v_cond.reshape(B, -1) * v_uncond.reshape(B, -1)).sum(dim=1)
    norm = v_uncond.reshape(B, -1).square().sum(dim=1) + 1e-8
    return (dot / norm).reshape(B, *[1] * (v_cond.ndim - 1))


def guided_step(step: int, steps: int, cfg_end: float) -> bool:
    """Whether step `step` of `steps` still runs guidance with `cfg_end` (the fraction of the steps that do)."""
    return cfg_end >= 1.0 or step < cfg_end * steps


def _repeated(conditions: dict, n: int) -> dict:
    """Conditions for a batch of `n` passes: every tensor (also inside (tensor, strength) pairs) repeated n times."""
    def repeat(value):
        if isinstance(value, torch.Tensor):
            return torch.cat([value] * n)
        if isinstance(value, (list, tuple)):
            return type(value)(repeat(v) for v in value)
        return value
    return {k: repeat(v) for k, v in conditions.items()}


def _weighted_mean(outputs: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    if len(outputs) == 1:
        return outputs[0][0]  # one prompt: its velocity itself, bit for bit
    total = sum(w for _, w in outputs)
    return sum(o * (w / total) for o, w in outputs)


def sequential_guidance(guidance: ClassifierFreeGuidance) -> str | None:
    """Out-of-memory fallback (`sora.memory.MemoryManager.retry_on_oom`): run the guidance passes as separate
    forwards (a fraction of the activations, the same result). None when they already are."""
    if guidance.negative is None and len(guidance.positive) == 1 or not guidance.batched:
        return None
    guidance.batched = False
    return "running guidance as separate forwards"


# ---------------------------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------------------------

def is_high_noise_step(sigma: float, boundary_t: float) -> bool:
    """The reference test `t ≥ boundary_t` with t = σ·1000. The reference truncates t to an integer first; with an
    integer boundary that gives the same answer."""
    return sigma * 1000.0 >= boundary_t


def expert_step_counts(sigmas: torch.Tensor, boundary_t: float) -> tuple[int, int]:
    """(high-noise steps, low-noise steps) of a schedule; e.g. 40 steps, shift 12, boundary 875 → (26, 14)."""
    high = sum(is_high_noise_step(float(s), boundary_t) for s in sigmas[:-1])
    return high, len(sigmas) - 1 - high


@dataclass
class Guider:
    """The velocity of one step: the step's expert (the high-noise model, or the low-noise one below
    `boundary_t`), its guidance scale and the guidance passes; `extra_channels` [B, C_extra, T, H, W] (Wan I2V's
    image channels) are appended to the latent's channels of every pass of both experts. `cfg_end`: guidance
    only on that fraction of the steps (then the cond pass alone); `zero_steps`: the first steps' velocity is 0
    (CFG-Zero*'s zero-init, no forward)."""
    model: ModelHandle
    cfg: ClassifierFreeGuidance
    scales: list[float]
    low_noise_model: ModelHandle | None = None
    low_scales: list[float] | None = None
    boundary_t: float = 875.0
    extra_channels: torch.Tensor | None = None
    conditions: dict = field(default_factory=dict)  # the model's keyword inputs (image tokens, VACE contexts)
    cfg_end: float = 1.0
    zero_steps: int = 0

    def expert(self, sigma: float) -> tuple[ModelHandle, bool]:
        """The model of a step at `sigma`, and whether it is the high-noise one."""
        high = self.low_noise_model is None or is_high_noise_step(sigma, self.boundary_t)
        return (self.model if high else self.low_noise_model), high

    def velocity(self, x: torch.Tensor, timestep: torch.Tensor, call: ModelCall) -> torch.Tensor:
        if call.step < self.zero_steps:
            self.cfg.last = None
            return torch.zeros_like(x)
        model, high = self.expert(call.sigma)
        scale = self.scales[call.step] if high else self.low_scales[call.step]
        if not guided_step(call.step, call.steps, self.cfg_end):
            scale = 1.0
        if self.extra_channels is not None:
            x = torch.cat([x, self.extra_channels], dim=1)
        return self.cfg.velocity(model, x, timestep, scale, call, **self.conditions)
