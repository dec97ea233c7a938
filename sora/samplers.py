"""Sampling, in parts as ComfyUI's custom sampling has them: noise, known frames, guider, solver, sigmas.

`sample` is their composition, and each part can be used (and tested) alone:

- the initial noise: `initial_noise`, drawn on the CPU with a seeded `torch.Generator` in float32 and then moved to
  the device, so the same seed gives the same bits on every device and matches ComfyUI's noise for the same seed
  and latent shape (the Wan reference draws on the GPU, so its seeds do not carry over);
- known-frame conditioning: `sora.conditioning.KnownFrames` (a LATENT's `noise_mask`);
- the guider: `sora.guidance.Guider` (classifier-free guidance over one or more prompts per side, the Wan 2.2
  A14B expert hand-off, Wan I2V image channels);
- the solver loop: `solve` walks a `sora.solvers.Solver` along the sigmas, calling `StepHooks` before and after
  every step (progress, previews, cancel; a step cache plugs into the model handle, which learns the step from the
  `ModelCall` each model call carries); `solve_with` drives a sampler function of another framework instead
  (inside ComfyUI, any core SAMPLER) through a denoiser `x, σ -> x0`;
- the result: `finish`, back to a raw latent, with kept frames exactly as given.

Formulation (ARCH_FACTS §4.1): `x_σ = (1 − σ)·x0 + σ·ε`, `v = ε − x0`, `x0 = x − σ·v`, DiT timestep `σ·1000`.
"""
from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from . import memory
from .conditioning import KnownFrames, prepare_mask
from .errors import InputError, Interrupted
from .guidance import ClassifierFreeGuidance, Guider, guidance_scales, sequential_guidance
from .handle import ModelCall, ModelHandle, as_handle
from .latent_formats import LatentFormat, format_of
from .schedules import check_sigmas, split_denoise
from .solvers import SAMPLERS, Solver, make_solver

__all__ = ["SAMPLERS", "ExternalSampler", "Sampled", "StepHooks", "finish", "initial_noise", "sample", "solve",
           "solve_with", "start_from"]

Callback = Callable[[int, int, torch.Tensor], None]  # (step done 1..total, total, x0 as a raw latent)
Velocity = Callable[[torch.Tensor, torch.Tensor, ModelCall], torch.Tensor]  # (x, timestep, call) -> v


# ---------------------------------------------------------------------------------------------------------------
# Noise and the start
# ---------------------------------------------------------------------------------------------------------------

def initial_noise(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of `shape`: one float32 `randn` on a CPU generator seeded with `seed`, then moved to
    `device`, so a seed gives the same bits on every device (and the same noise as ComfyUI for that shape)."""
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be a whole number in [0, 2^64), got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def start_from(raw: torch.Tensor, fmt: LatentFormat) -> torch.Tensor:
    """The model-space start of a raw latent; frames that are all zero (an empty latent) start from zero, as
    ComfyUI does."""
    x = fmt.normalize(raw)
    empty = (raw == 0).all(dim=1, keepdim=True).all(dim=3, keepdim=True).all(dim=4, keepdim=True)  # [B, 1, T, 1, 1]
    return torch.where(empty, torch.zeros_like(x), x)


# ---------------------------------------------------------------------------------------------------------------
# The solver loop
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class StepHooks:
    """Called around every step: `before(step)` (may raise `Interrupted` to stop) and `after(step, x0)` with the
    step's clean prediction in model space, known frames shown clean."""
    before: Callable[[int], None] | None = None
    after: Callable[[int, torch.Tensor], None] | None = None


def solve(solver: Solver, velocity: Velocity, noise: torch.Tensor, start: torch.Tensor,
          known: KnownFrames | None = None, hooks: StepHooks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk `solver.sigmas` from `σ0·noise + (1 − σ0)·start`; returns the sample at the last sigma and the last
    step's x0 prediction, both in model space. `noise` zeros continue a partial result."""
    hooks = hooks or StepHooks()
    sigmas, total = solver.sigmas, solver.steps
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * start
    if known is not None:
        x = known.impose(x, sigmas[0])
    x0 = x
    for i in range(total):
        if hooks.before is not None:
            hooks.before(i)
        sigma = sigmas[i]
        v = velocity(x, _timestep(known, sigma, x), ModelCall(i, total, sigma))
        x0 = x - sigma * v
        x = solver.step(i, x, v)
        if known is not None:
            x = known.impose(x, sigmas[i + 1])
            x0 = known.clean(x0)
        if hooks.after is not None:
            hooks.after(i, x0)
    return x, x0


class ExternalSampler(Protocol):
    """A sampler function of another framework: from `noise` and `start` (it adds the noise at sigmas[0] itself)
    along `sigmas`, calling `denoise(x, σ) -> x0` and `callback(step, x0)`; returns the sample at the last sigma.
    After each call `denoise.cond` and `denoise.uncond` hold the x0 of the conditional and unconditional passes
    (uncond None without guidance), for samplers that combine them themselves (ComfyUI's CFG++)."""
    def __call__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 start: torch.Tensor, sigmas: torch.Tensor, callback: Callable[[int, torch.Tensor], None]
                 ) -> torch.Tensor:
        ...


def solve_with(external: ExternalSampler, velocity: Velocity, noise: torch.Tensor, start: torch.Tensor,
               sigmas: Sequence[float], known: KnownFrames | None = None, hooks: StepHooks | None = None,
               passes: Callable[[], tuple | None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """`solve` with an external sampler function; known frames are imposed around every model call (as
    ComfyUI's inpainting wrapper does). A call between two sigmas (a second-order sampler's midpoint) counts as the
    step it lies in. `passes()` gives the last call's (v_cond, v_uncond or None)."""
    hooks = hooks or StepHooks()
    total = len(sigmas) - 1
    last = {"x0": start}

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        step = min(sum(1 for level in sigmas[1:-1] if level >= s), total - 1)
        if hooks.before is not None:
            hooks.before(step)
        if known is not None:
            x = known.impose(x, s)
        x0 = x - s * velocity(x, _timestep(known, s, x), ModelCall(step, total, s))
        last["x0"] = x0 = known.clean(x0) if known is not None else x0
        v_cond, v_uncond = passes() or (None, None)
        denoise.cond = x0 if v_cond is None else x - s * v_cond
        denoise.uncond = None if v_uncond is None else x - s * v_uncond
        return x0

    denoise.cond = denoise.uncond = None

    def callback(step: int, x0: torch.Tensor) -> None:
        if hooks.after is not None:
            hooks.after(step, x0)

    x = external(denoise, noise, start, torch.tensor(sigmas, dtype=torch.float32), callback)
    if known is not None:
        x = known.impose(x, sigmas[-1])
    return x, last["x0"]


def _timestep(known: KnownFrames | None, sigma: float, x: torch.Tensor) -> torch.Tensor:
    if known is not None:
        return known.timestep(sigma)
    return torch.full((x.shape[0],), sigma * 1000.0, device=x.device)


def finish(x: torch.Tensor, sigma_end: float, fmt: LatentFormat, raw: torch.Tensor,
           known: KnownFrames | None) -> torch.Tensor:
    """A solver's model-space sample at `sigma_end` -> raw latent. Above 0 that is ComfyUI's partial latent
    `x/(1 − σ_end)`, which another sampler continues with `add_noise=False`. Kept frames come back as given,
    blended in raw space (not through a normalise/denormalise round trip)."""
    out = fmt.denormalize(x / (1.0 - sigma_end) if sigma_end > 0 else x)
    if known is not None:
        out = out * known.mask + raw * (1.0 - known.mask)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The composition
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampled:
    """What a run returns: `latent`, the raw latent at the last sigma (ComfyUI's SamplerCustom "output"), and
    `denoised`, the last step's clean prediction as a raw latent ("denoised_output")."""
    latent: torch.Tensor
    denoised: torch.Tensor


def _release_on_stop(function):
    """Let a run stopped by an interrupt or out-of-memory error free its tensors at once: the exception's
    traceback would otherwise keep the run's frames, and with them the latents and solver history, alive for as
    long as the caller holds the exception."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (Interrupted, torch.cuda.OutOfMemoryError) as error:
            traceback.clear_frames(error.__traceback__)
            raise
    return run


def sample(model, latent: torch.Tensor, sigmas: torch.Tensor, positive, negative=None, **options) -> torch.Tensor:
    """Denoise `latent` along `sigmas` and return the result as a raw latent; `run_sampling(...).latent`."""
    return run_sampling(model, latent, sigmas, positive, negative, **options).latent


@_release_on_stop
@torch.no_grad()
def run_sampling(model, latent: torch.Tensor, sigmas: torch.Tensor, positive, negative=None, *,
                 guidance: float | Sequence[float] | torch.Tensor = 5.0, sampler: str | ExternalSampler = "unipc",
                 seed: int = 0, noise_mask: torch.Tensor | None = None, low_noise_model=None,
                 boundary_t: float = 875.0, low_noise_guidance: float | Sequence[float] | torch.Tensor | None = None,
                 denoise: float = 1.0, add_noise: bool = True, batched_cfg: bool = True,
                 extra_channels: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None,
                 vace: Sequence[tuple[torch.Tensor, float]] = (), callback: Callback | None = None,
                 interrupt: Callable[[], None] | None = None, device: torch.device | str | None = None,
                 cfg_end: float = 1.0, cfg_zero_star: bool = False, zero_init_steps: int = 0) -> Sampled:
    """Denoise `latent` along `sigmas`.

    model: a `sora.handle.ModelHandle`, or a model `model(x, timestep, context) -> v` with `config.latent_format`
        and `config.per_token_timesteps`; the high-noise expert when `low_noise_model` is given.
    latent: raw VAE latent [B, C, T, H, W] (ComfyUI LATENT "samples"). Noise is added to it at sigmas[0]:
        `σ0·ε + (1 − σ0)·latent`. Frames that are all zero (an empty latent) start from zero in model space, as
        ComfyUI does.
    sigmas: SIGMAS, strictly decreasing in [0, 1]; a schedule that stops above 0 returns ComfyUI's partial
        latent `x/(1 − σ_end)`, which another sampler continues with `add_noise=False`.
    positive, negative: text contexts [B or 1, L, D], or lists of `sora.guidance.Prompt` (several conditioning
        entries, combined as ComfyUI combines them); negative None runs without guidance.
    guidance: the CFG scale, one number or one per step of `sigmas`; 1 skips the unconditional pass.
    sampler: "euler", "unipc", "dpm++_2m" or "lcm" (few-step distilled models), or an `ExternalSampler`.
    seed: the initial noise (see `initial_noise`).
    noise_mask: LATENT "noise_mask" [B, 1, T, H, W], 1 = generate, 0 = keep (see sora.conditioning); kept frames
        come back exactly as given.
    low_noise_model, boundary_t: the second expert, used for steps with σ·1000 < boundary_t (Wan 2.2 A14B).
    low_noise_guidance: the low-noise expert's scale(s); default `guidance`.
    denoise: keep only the last round(steps·denoise) steps (ComfyUI's SplitSigmasDenoise); 0 returns the input.
    add_noise: False takes `latent` as a partial result to continue (no new noise).
    batched_cfg: the guidance passes in one forward (True) or one each (less memory).
    extra_channels: [B or 1, C_extra, T, H, W] appended to the latent's channels on every model call, the same for
        every guidance pass (Wan I2V models: `conditioning.wan_i2v_channels`).
    image_tokens: CLIP image tokens [B or 1, N, 1280] for a model with an image branch (Wan 2.1 I2V / FLF2V),
        the same for every guidance pass.
    vace: VACE contexts [B or 1, 96, T, H, W] with their strengths (`sora.vace`), the same for every pass.
    callback: called after every step as `callback(step, total, x0)` with step = 1..total and x0 that step's
        prediction of the clean raw latent, for progress and previews.
    interrupt: called before every step; it raises sora.errors.Interrupted to stop the run, which then releases
        every tensor it made.
    device: where to compute; default the model's parameters' device, else the latent's.
    cfg_end: the fraction of the steps that run guidance; after it one forward per step (cond only). 1 = all.
    cfg_zero_star: combine the passes with CFG-Zero*'s optimised scale (`sora.guidance.optimized_scale`).
    zero_init_steps: the first steps whose velocity is zero (CFG-Zero*'s zero-init; no forward on them).
    Model wrappers with an `end_run(finished)` method (a step cache) are told when the run ends.
    """
    high = as_handle(model)
    low = None if low_noise_model is None else as_handle(low_noise_model)
    fmt, per_token = _model_format(high)
    if low is not None and _model_format(low) != (fmt, per_token):
        raise InputError("the two experts differ in latent format or timestep kind; pair the high- and "
                         "low-noise models of one release")
    if not isinstance(latent, torch.Tensor) or latent.ndim != 5 or latent.shape[1] != fmt.channels:
        got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise InputError(f"the latent must be [B, {fmt.channels}, T, H, W] for a {fmt.name} model, got {got}")
    if not 0.0 <= cfg_end <= 1.0:
        raise InputError(f"cfg_end must be a fraction of the steps in [0, 1], got {cfg_end}")
    if not isinstance(zero_init_steps, int) or zero_init_steps < 0:
        raise InputError(f"zero_init_steps must be a whole number of steps, 0 or more; got {zero_init_steps!r}")
    sigmas = check_sigmas(sigmas)
    steps = max(len(sigmas) - 1, 0)
    scales = guidance_scales(guidance, steps)
    low_scales = scales if low_noise_guidance is None else guidance_scales(low_noise_guidance, steps)
    sigmas = [float(s) for s in split_denoise(sigmas, denoise)]
    if len(sigmas) < 2:
        return Sampled(latent.clone(), latent.clone())  # nothing to denoise: the input, bit for bit
    total = len(sigmas) - 1
    scales, low_scales = scales[steps - total:], low_scales[steps - total:]

    device = torch.device(device) if device is not None else _default_device(high, latent)
    raw = latent.to(device, torch.float32)
    start = start_from(raw, fmt)
    noise = initial_noise(raw.shape, seed, device)
    known = None
    if noise_mask is not None:
        known = KnownFrames(prepare_mask(noise_mask, raw.shape).to(device), start, noise, per_token)
    cfg = ClassifierFreeGuidance(positive, negative, raw.shape[0], batched_cfg, zero_star=cfg_zero_star).to(device)
    conditions = {}
    if image_tokens is not None:
        conditions["image"] = image_tokens.to(device, torch.float32).expand(raw.shape[0], -1, -1)
    if vace:
        conditions["vace"] = [(c.to(device, torch.float32).expand(raw.shape[0], -1, -1, -1, -1), float(s))
                              for c, s in vace]
    guider = Guider(high, cfg, scales, low, low_scales, boundary_t, _image_channels(extra_channels, raw), conditions,
                    cfg_end=cfg_end, zero_steps=zero_init_steps)
    manager = memory.get_manager()

    def velocity(x: torch.Tensor, timestep: torch.Tensor, call: ModelCall) -> torch.Tensor:
        # sora.memory: an out-of-memory error retries this step with a smaller footprint instead of failing the run
        return manager.retry_on_oom(lambda: guider.velocity(x, timestep, call),
                                    functools.partial(sequential_guidance, cfg), what=f"sampling step {call.step + 1}")

    hooks = StepHooks(
        before=(lambda i: interrupt()) if interrupt is not None else None,
        after=(lambda i, x0: callback(i + 1, total, fmt.denormalize(x0))) if callback is not None else None)
    initial = noise if add_noise else torch.zeros_like(noise)
    finished = False
    try:
        if isinstance(sampler, str):
            x, x0 = solve(make_solver(sampler, sigmas, seed), velocity, initial, start, known, hooks)
        else:
            x, x0 = solve_with(sampler, velocity, initial, start, sigmas, known, hooks, lambda: cfg.last)
        finished = True
    finally:
        _end_run([high] if low is None else [high, low], finished)
    return Sampled(finish(x, sigmas[-1], fmt, raw, known).to(latent.device),
                   finish(x0, 0.0, fmt, raw, known).to(latent.device))


def _end_run(handles: list[ModelHandle], finished: bool) -> None:
    """Tell each wrapper of the run's models that has an `end_run` (a step cache reports and forgets its state)."""
    told = set()
    for handle in handles:
        for wrapper in handle.wrappers:
            end_run = getattr(wrapper, "end_run", None)
            if end_run is not None and id(wrapper) not in told:
                told.add(id(wrapper))
                end_run(finished)


def _image_channels(extra: torch.Tensor | None, raw: torch.Tensor) -> torch.Tensor | None:
    """`extra` checked against the latent and broadcast over its batch."""
    if extra is None:
        return None
    B, _, T, H, W = raw.shape
    if extra.ndim != 5 or extra.shape[0] not in (1, B) or tuple(extra.shape[2:]) != (T, H, W):
        raise InputError(f"extra_channels {tuple(extra.shape)} must be [B or 1, C, {T}, {H}, {W}] like the latent")
    return extra.to(raw.device, torch.float32).expand(B, -1, -1, -1, -1)


def _model_format(model: ModelHandle) -> tuple[LatentFormat, bool]:
    config = getattr(model.model, "config", None)
    if config is None or not hasattr(config, "latent_format") or not hasattr(config, "per_token_timesteps"):
        raise InputError("the model has no config.latent_format / config.per_token_timesteps; load it with "
                         "sora.dit.load_dit")
    return format_of(config.latent_format), bool(config.per_token_timesteps)


def _default_device(model: ModelHandle, latent: torch.Tensor) -> torch.device:
    parameters = getattr(model.model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return latent.device
