"""Flow-matching solvers: Euler, UniPC (bh2, order 2) and DPM-Solver++ 2M.

Formulation (ARCH_FACTS §4.1): `x_σ = (1 − σ)·x0 + σ·ε`; the model predicts `v = ε − x0`, so the data prediction
is `x0 = x − σ·v`. The multistep solvers work in the half log-SNR `λ(σ) = ln(1 − σ) − ln σ` with α = 1 − σ.
Each solver is a small class that walks a fixed sigma grid, one model evaluation per step; its state (the
history of x0 predictions) is the only thing carried between steps, so two experts can share it. A run split over
two samplers (ComfyUI's SplitSigmas) starts the second one's history afresh, as ComfyUI's own multistep samplers do;
Euler has no history, so a split Euler run equals one run.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from .errors import InputError


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


class LCM(Solver):
    """Consistency-style few-step sampling (what distillation LoRAs such as lightx2v's step-distill and CausVid are
    trained for, ECOSYSTEM_FACTS §2): predict x0 = x − σ·v, then noise it afresh to the next sigma,
    x' = (1 − σ')·x0 + σ'·ε with new noise ε; the last step returns x0. The fresh noise comes from a CPU generator
    seeded with the run's seed (as ComfyUI's lcm sampler seeds its noise sampler), so a seed gives the same video
    on every device."""

    def __init__(self, sigmas: Sequence[float], seed: int = 0):
        super().__init__(sigmas)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sigmas[i] * v
        sigma = self.sigmas[i + 1]
        if sigma == 0.0:
            return x0
        noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device)
        return (1.0 - sigma) * x0 + sigma * noise


SAMPLERS: dict[str, type[Solver]] = {"euler": Euler, "unipc": UniPC, "dpm++_2m": DPMSolverPP2M, "lcm": LCM}


def make_solver(name: str, sigmas: Sequence[float], seed: int = 0) -> Solver:
    """The solver `name` over `sigmas`; `seed` feeds the ones that draw fresh noise (lcm)."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return LCM(sigmas, seed) if name == "lcm" else SAMPLERS[name](sigmas)
