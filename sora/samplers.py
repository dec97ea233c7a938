"""Flow-matching samplers: Euler, UniPC (bh2, order 2) and DPM-Solver++ 2M, and the `sample` entry point.

Formulation (ARCH_FACTS §4.1): `x_σ = (1 − σ)·x0 + σ·ε`; the model predicts `v = ε − x0`, so the data prediction
is `x0 = x − σ·v`. The multistep solvers work in the half log-SNR `λ(σ) = ln(1 − σ) − ln σ` with α = 1 − σ.
Each solver is a small class that walks a fixed sigma grid, one model evaluation per step; its state (the
history of x0 predictions) is the only thing carried between steps, so two experts can share it.

Noise is drawn on the CPU with a seeded `torch.Generator` in float32 and then moved to the device: the same seed
gives the same bits on every device and matches ComfyUI's noise for the same seed and latent shape. (The Wan
reference draws on the GPU, so its seeds do not carry over.)
"""
from __future__ import annotations

import functools
import math
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from . import memory
from .conditioning import KnownFrames, prepare_mask
from .errors import InputError, Interrupted
from .guidance import ClassifierFreeGuidance, Model, guidance_scales, is_high_noise_step
from .latent_formats import FORMATS, LatentFormat
from .schedules import check_sigmas, split_denoise


def half_log_snr(sigma: float) -> float:
    """λ(σ) = ln(α/σ) with α = 1 − σ; −∞ at pure noise, +∞ at clean data."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


class Solver(ABC):
    """Advances a sample along `sigmas`: `step(i, x, v)` goes from sigmas[i] to sigmas[i + 1], given the velocity
    `v` predicted at (x, sigmas[i]). Steps must be taken in order, 0 to len(sigmas) − 2."""

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1

    @abstractmethod
    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ...


class Euler(Solver):
    """First order: x' = x + (σ' − σ)·v."""

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v


class UniPC(Solver):
    """UniPC, variant "bh2", order 2, data prediction (Zhao et al. 2023, arXiv:2302.04867), as the Wan reference
    runs it (ARCH_FACTS §4.5). In bh2 the scaling B(h) equals φ1 = e^{−h} − 1, so one coefficient serves both.

    Each step first corrects the previous step's result with the new x0 prediction (UniC, no extra model call),
    then predicts the next sample (UniP). The first step and the last step are first order.
    """

    def __init__(self, sigmas: Sequence[float]):
        super().__init__(sigmas)
        self.history: list[torch.Tensor] = []  # the last two x0 predictions, oldest first
        self.last_sample: torch.Tensor | None = None  # the previous step's (corrected) sample
        self.last_order = 0

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sigmas[i] * v
        if i > 0:
            x = self._correct(i, x0)
        self.history = [*self.history[-1:], x0]
        order = min(2, self.steps - i, len(self.history))
        self.last_sample, self.last_order = x, order
        return self._predict(i, x, order)

    @staticmethod
    def _coefficients(s: float, t: float) -> tuple[float, float, float]:
        """For a step from sigma s to t: h = λ(t) − λ(s), φ1 = e^{−h} − 1 (−1 when t = 0) and α_t = 1 − t."""
        h = half_log_snr(t) - half_log_snr(s)
        return h, math.expm1(-h), 1.0 - t

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        s, t = self.sigmas[i], self.sigmas[i + 1]
        h, phi, alpha_t = self._coefficients(s, t)
        m0 = self.history[-1]
        x_next = (t / s) * x - (alpha_t * phi) * m0
        if order == 2:
            r = (half_log_snr(self.sigmas[i - 1]) - half_log_snr(s)) / h
            d = (self.history[-2] - m0) / r
            x_next = x_next - (alpha_t * phi * 0.5) * d  # the predictor's order-2 weight is fixed at 1/2
        return x_next

    def _correct(self, i: int, x0: torch.Tensor) -> torch.Tensor:
        """Redo the step sigmas[i − 1] → sigmas[i] using the model's answer at sigmas[i]."""
        s, t = self.sigmas[i - 1], self.sigmas[i]
        h, phi, alpha_t = self._coefficients(s, t)
        m0 = self.history[-1]
        x = (t / s) * self.last_sample - (alpha_t * phi) * m0
        if self.last_order == 1:
            return x - (alpha_t * phi * 0.5) * (x0 - m0)
        # Order 2: weights from the 2×2 system [[1, 1], [r, 1]]·ρ = b, with b_k from the φ-function recursion.
        hh = -h
        g1 = phi / hh - 1.0
        g2 = g1 / hh - 0.5
        b1, b2 = g1 / phi, 2.0 * g2 / phi
        r = (half_log_snr(self.sigmas[i - 2]) - half_log_snr(s)) / h
        rho_old = (b2 - b1) / (r - 1.0)  # → 0 when the older point lies at σ = 1 (r = −∞): its term vanishes
        rho_new = b1 - rho_old
        d = (self.history[-2] - m0) / r
        return x - (alpha_t * phi) * (rho_old * d + rho_new * (x0 - m0))


class DPMSolverPP2M(Solver):
    """DPM-Solver++ 2M with the midpoint rule (Lu et al. 2022, arXiv:2211.01095), ARCH_FACTS §4.6.
    First order on the first and the last step (the last goes to σ = 0, where λ is infinite)."""

    def __init__(self, sigmas: Sequence[float]):
        super().__init__(sigmas)
        self.previous: torch.Tensor | None = None  # the previous step's x0 prediction

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, t = self.sigmas[i], self.sigmas[i + 1]
        x0 = x - s * v
        h = half_log_snr(t) - half_log_snr(s)
        scale = (1.0 - t) * math.expm1(-h)
        x_next = (t / s) * x - scale * x0
        if self.previous is not None and i < self.steps - 1:
            r = (half_log_snr(s) - half_log_snr(self.sigmas[i - 1])) / h
            x_next = x_next - (0.5 * scale / r) * (x0 - self.previous)
        self.previous = x0
        return x_next


SAMPLERS: dict[str, type[Solver]] = {"euler": Euler, "unipc": UniPC, "dpm++_2m": DPMSolverPP2M}


def make_solver(name: str, sigmas: Sequence[float]) -> Solver:
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](sigmas)


def initial_noise(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of `shape`: one float32 `randn` on a CPU generator seeded with `seed`, then moved to
    `device`, so a seed gives the same bits on every device (and the same noise as ComfyUI for that shape)."""
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be a whole number in [0, 2^64), got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------

Callback = Callable[[int, int, torch.Tensor], None]


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


@_release_on_stop
@torch.no_grad()
def sample(model: Model, latent: torch.Tensor, sigmas: torch.Tensor, positive: torch.Tensor,
           negative: torch.Tensor | None = None, *, guidance: float | Sequence[float] | torch.Tensor = 5.0,
           sampler: str = "unipc", seed: int = 0, noise_mask: torch.Tensor | None = None,
           low_noise_model: Model | None = None, boundary_t: float = 875.0,
           low_noise_guidance: float | Sequence[float] | torch.Tensor | None = None, denoise: float = 1.0,
           add_noise: bool = True, batched_cfg: bool = True, extra_channels: torch.Tensor | None = None,
           callback: Callback | None = None, interrupt: Callable[[], None] | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Denoise `latent` along `sigmas` and return the result as a raw latent.

    model: `model(x, timestep, context) -> v` with `model.config.latent_format` and
        `model.config.per_token_timesteps`; the high-noise expert when `low_noise_model` is given.
    latent: raw VAE latent [B, C, T, H, W] (ComfyUI LATENT "samples"). Noise is added to it at sigmas[0]:
        `σ0·ε + (1 − σ0)·latent`. Frames that are all zero (an empty latent) start from zero in model space, as
        ComfyUI does.
    sigmas: SIGMAS, strictly decreasing in [0, 1]; a schedule that stops above 0 returns ComfyUI's partial
        latent `x/(1 − σ_end)`, which another sampler continues with `add_noise=False`.
    positive, negative: text contexts [B or 1, L, D]; negative None runs without guidance.
    guidance: the CFG scale, one number or one per step of `sigmas`; 1 skips the unconditional pass.
    sampler: "euler", "unipc" or "dpm++_2m".
    seed: the initial noise (see `initial_noise`).
    noise_mask: LATENT "noise_mask" [B, 1, T, H, W], 1 = generate, 0 = keep (see sora.conditioning); kept frames
        come back exactly as given.
    low_noise_model, boundary_t: the second expert, used for steps with σ·1000 < boundary_t (Wan 2.2 A14B).
    low_noise_guidance: the low-noise expert's scale(s); default `guidance`.
    denoise: keep only the last round(steps·denoise) steps (ComfyUI's SplitSigmasDenoise); 0 returns the input.
    add_noise: False takes `latent` as a partial result to continue (no new noise).
    batched_cfg: the conditional and unconditional passes in one forward (True) or two (less memory).
    extra_channels: [B or 1, C_extra, T, H, W] appended to the latent's channels on every model call, the same for
        both guidance passes (Wan I2V models: `conditioning.wan_i2v_channels`).
    callback: called after every step as `callback(step, total, x0)` with step = 1..total and x0 that step's
        prediction of the clean raw latent, for progress and previews.
    interrupt: called before every step; it raises sora.errors.Interrupted to stop the run, which then releases
        every tensor it made.
    device: where to compute; default the model's parameters' device, else the latent's.
    """
    fmt, per_token = _model_format(model)
    if low_noise_model is not None and _model_format(low_noise_model) != (fmt, per_token):
        raise InputError("the two experts differ in latent format or timestep kind; pair the high- and "
                         "low-noise models of one release")
    if not isinstance(latent, torch.Tensor) or latent.ndim != 5 or latent.shape[1] != fmt.channels:
        got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise InputError(f"the latent must be [B, {fmt.channels}, T, H, W] for a {fmt.name} model, got {got}")
    sigmas = check_sigmas(sigmas)
    steps = max(len(sigmas) - 1, 0)
    scales = guidance_scales(guidance, steps)
    low_scales = scales if low_noise_guidance is None else guidance_scales(low_noise_guidance, steps)
    sigmas = [float(s) for s in split_denoise(sigmas, denoise)]
    if len(sigmas) < 2:
        return latent.clone()  # nothing to denoise: the input, bit for bit
    total = len(sigmas) - 1
    scales, low_scales = scales[steps - total:], low_scales[steps - total:]

    device = torch.device(device) if device is not None else _default_device(model, latent)
    raw = latent.to(device, torch.float32)
    start = _to_model_space(raw, fmt)
    noise = initial_noise(raw.shape, seed, device)
    x = (sigmas[0] * noise if add_noise else 0.0) + (1.0 - sigmas[0]) * start
    known = None
    if noise_mask is not None:
        known = KnownFrames(prepare_mask(noise_mask, raw.shape).to(device), start, noise, per_token)
        x = known.impose(x, sigmas[0])
    cfg = ClassifierFreeGuidance(positive, negative, raw.shape[0], batched_cfg).to(device)
    solver = make_solver(sampler, sigmas)
    if extra_channels is not None:
        model, low_noise_model = _with_channels(model, extra_channels, raw), _with_channels(low_noise_model,
                                                                                          extra_channels, raw)

    for i in range(total):
        if interrupt is not None:
            interrupt()
        sigma = sigmas[i]
        high = low_noise_model is None or is_high_noise_step(sigma, boundary_t)
        if known is not None:
            timestep = known.timestep(sigma)
        else:
            timestep = torch.full((raw.shape[0],), sigma * 1000.0, device=device)
        # sora.memory: an out-of-memory error retries this step with a smaller footprint instead of failing the run
        v = memory.get_manager().retry_on_oom(
            lambda: cfg.velocity(model if high else low_noise_model, x, timestep, scales[i] if high else low_scales[i]),
            functools.partial(memory.sequential_guidance, cfg), what=f"sampling step {i + 1}")
        x0 = x - sigma * v if callback is not None else None
        x = solver.step(i, x, v)
        if known is not None:
            x = known.impose(x, sigmas[i + 1])
        if callback is not None:
            callback(i + 1, total, fmt.denormalize(known.clean(x0) if known is not None else x0))

    if sigmas[-1] > 0:
        return fmt.denormalize(x / (1.0 - sigmas[-1])).to(latent.device)
    out = fmt.denormalize(x)
    if known is not None:
        # Blend in raw space so kept frames are the given values exactly, not a normalise/denormalise round trip.
        out = out * known.mask + raw * (1.0 - known.mask)
    return out.to(latent.device)


def _with_channels(model: Model | None, extra: torch.Tensor, raw: torch.Tensor) -> Model | None:
    """`model` with `extra` appended to its input's channels (broadcast over the guidance batch)."""
    if model is None:
        return None
    B, _, T, H, W = raw.shape
    if extra.ndim != 5 or extra.shape[0] not in (1, B) or tuple(extra.shape[2:]) != (T, H, W):
        raise InputError(f"extra_channels {tuple(extra.shape)} must be [B or 1, C, {T}, {H}, {W}] like the latent")
    extra = extra.to(raw.device, torch.float32).expand(B, -1, -1, -1, -1)

    def call(x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        passes = x.shape[0] // B  # 2 when guidance batches [cond; uncond]
        return model(torch.cat([x, extra.repeat(passes, 1, 1, 1, 1)], dim=1), timestep, context)
    return call


def _model_format(model: Model) -> tuple[LatentFormat, bool]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "latent_format") or not hasattr(config, "per_token_timesteps"):
        raise InputError("the model has no config.latent_format / config.per_token_timesteps; load it with "
                         "sora.dit.load_dit")
    if config.latent_format not in FORMATS:
        raise InputError(f"the model's latent format {config.latent_format!r} is unknown; known: "
                         f"{', '.join(FORMATS)}")
    return FORMATS[config.latent_format], bool(config.per_token_timesteps)


def _default_device(model: Model, latent: torch.Tensor) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return latent.device


def _to_model_space(raw: torch.Tensor, fmt: LatentFormat) -> torch.Tensor:
    x = fmt.normalize(raw)
    empty = (raw == 0).all(dim=1, keepdim=True).all(dim=3, keepdim=True).all(dim=4, keepdim=True)  # [B, 1, T, 1, 1]
    return torch.where(empty, torch.zeros_like(x), x)
