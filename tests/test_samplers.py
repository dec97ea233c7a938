"""Solvers step for step against diffusers' schedulers, against an analytic flow, and the `sample` entry point."""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from test_sampling_fakes import TinyDiT, tiny_context

from sora.errors import InputError
from sora.latent_formats import WAN21
from sora.samplers import initial_noise, make_solver, sample
from sora.schedules import flow_sigmas

SHAPE = (2, 4, 3, 4, 4)


def _velocity_field(steps: int):
    """A model output that depends on the sample (so each solver's own trajectory matters) and on the step."""
    generator = torch.Generator().manual_seed(7)
    mix = torch.randn(4, 4, generator=generator) * 0.3
    offsets = [torch.randn(SHAPE, generator=generator) for _ in range(steps)]
    return lambda x, i: torch.einsum("bcthw,cd->bdthw", x, mix) + offsets[i]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _compare_step_for_step(name: str, scheduler, sigmas: torch.Tensor) -> None:
    steps = len(sigmas) - 1
    velocity = _velocity_field(steps)
    solver = make_solver(name, sigmas.tolist())
    ours = theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for i in range(steps):
        ours = solver.step(i, ours, velocity(ours, i))
        theirs = scheduler.step(velocity(theirs, i), scheduler.timesteps[i], theirs).prev_sample
        assert _relative(ours, theirs) <= 1e-6, f"{name} step {i}"


@pytest.mark.parametrize("steps, shift", [(12, 5.0), (20, 12.0), (3, 3.0)])
def test_unipc_equals_diffusers_step_for_step(steps, shift):
    # The reference settings: bh2, order 2, data prediction, lower order at the end, corrector on every step.
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True)
    scheduler.set_timesteps(sigmas=np.linspace(0.999, 0.0, steps + 1)[:-1])
    sigmas = flow_sigmas(steps, shift, "wan_unipc")
    assert torch.equal(scheduler.sigmas, sigmas)
    _compare_step_for_step("unipc", scheduler, sigmas)


@pytest.mark.parametrize("steps, shift", [(12, 5.0), (20, 12.0), (3, 3.0)])
def test_dpmpp_2m_equals_diffusers_step_for_step(steps, shift):
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                            lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    sigmas = flow_sigmas(steps, shift, "wan_unipc")
    assert torch.equal(scheduler.sigmas, sigmas)
    _compare_step_for_step("dpm++_2m", scheduler, sigmas)


def test_dpmpp_2m_from_pure_noise_equals_diffusers():
    # The reference DPM++ grid starts at σ = 1 exactly (λ = −∞); diffusers cannot build it, so give it our sigmas.
    sigmas = flow_sigmas(10, 5.0, "wan_dpm")
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            final_sigmas_type="zero")
    scheduler.set_timesteps(10)
    scheduler.sigmas = sigmas.clone()
    _compare_step_for_step("dpm++_2m", scheduler, sigmas)


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_euler_equals_flow_match_euler_step_for_step(shift):
    sigmas = flow_sigmas(10, shift, "wan_dpm")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].numpy())
    _compare_step_for_step("euler", scheduler, sigmas)


def test_unipc_near_pure_noise_equals_diffusers():
    # diffusers nudges σ0 = 1 to 1 − 1e-6; on that grid we agree step for step. (At σ0 = 1 exactly our UniPC takes
    # the λ → −∞ limit instead; test_solvers_reach_the_analytic_endpoint covers that grid.)
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction")
    scheduler.set_timesteps(10)
    assert 0 < 1 - scheduler.sigmas[0] < 2e-6
    _compare_step_for_step("unipc", scheduler, scheduler.sigmas)


def test_solvers_reach_the_analytic_endpoint():
    # Data x0 ~ N(μ, s²): the exact velocity is known in closed form and the flow ODE carries ε to μ + s·ε.
    generator = torch.Generator().manual_seed(3)
    mu = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    spread = 0.5
    eps = torch.randn(SHAPE, generator=generator, dtype=torch.float64)

    def exact_velocity(x, sigma):
        gain = (1 - sigma) * spread**2 / ((1 - sigma) ** 2 * spread**2 + sigma**2)
        x0 = mu + gain * (x - (1 - sigma) * mu)
        return (x - x0) / sigma

    target = mu + spread * eps
    errors = {}
    sigmas = flow_sigmas(40, 5.0, "wan_dpm").double().tolist()  # starts at σ = 1 exactly
    for name in ("euler", "unipc", "dpm++_2m"):
        solver, x = make_solver(name, sigmas), eps.clone()
        for i in range(40):
            x = solver.step(i, x, exact_velocity(x, sigmas[i]))
        errors[name] = ((x - target).norm() / target.norm()).item()
    assert errors["euler"] < 0.1
    assert errors["unipc"] < errors["euler"] / 5 and errors["dpm++_2m"] < errors["euler"] / 5, errors


def test_initial_noise_is_the_seeded_cpu_draw():
    noise = initial_noise((1, 16, 2, 4, 4), seed=123)
    assert noise.dtype == torch.float32
    assert torch.equal(noise, torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(123)))
    assert torch.equal(noise, initial_noise((1, 16, 2, 4, 4), seed=123, device="cpu"))
    assert not torch.equal(noise, initial_noise((1, 16, 2, 4, 4), seed=124))
    with pytest.raises(InputError, match="seed"):
        initial_noise((1, 2), seed=-1)


def _run(sampler="unipc", seed=0, **kwargs):
    model = TinyDiT()
    latent = torch.zeros(1, 16, 3, 4, 4)
    return sample(model, latent, flow_sigmas(6, 5.0), tiny_context(), tiny_context(seed=1, length=3),
                  guidance=4.0, sampler=sampler, seed=seed, **kwargs)


@pytest.mark.parametrize("sampler", ["euler", "unipc", "dpm++_2m"])
def test_same_seed_same_bits(sampler):
    first = _run(sampler, seed=42)
    assert torch.equal(first, _run(sampler, seed=42))
    assert not torch.equal(first, _run(sampler, seed=43))
    assert first.shape == (1, 16, 3, 4, 4) and torch.isfinite(first).all()


def test_sample_equals_a_hand_written_euler_loop():
    # The whole pipeline by hand: empty latent -> noise at σ0 -> CFG Euler steps -> denormalise.
    model = TinyDiT()
    positive, negative = tiny_context(), tiny_context(seed=1, length=3)
    sigmas = flow_sigmas(5, 3.0)
    ours = sample(model, torch.zeros(1, 16, 2, 4, 4), sigmas, positive, negative, guidance=3.0, sampler="euler",
                  seed=5)
    x = sigmas[0].item() * torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    padded = torch.cat([negative, torch.zeros(1, 2, 8)], dim=1)
    for i in range(5):
        t = torch.full((1,), sigmas[i].item() * 1000)
        v_cond, v_uncond = model(x, t, positive), model(x, t, padded)
        x = x + (sigmas[i + 1].item() - sigmas[i].item()) * (v_uncond + 3.0 * (v_cond - v_uncond))
    torch.testing.assert_close(ours, WAN21.denormalize(x), rtol=1e-6, atol=1e-6)


def test_denoise_zero_returns_the_input_exactly():
    latent = torch.randn(1, 16, 3, 4, 4)
    out = sample(TinyDiT(), latent, flow_sigmas(6, 5.0), tiny_context(), guidance=1.0, denoise=0.0)
    assert torch.equal(out, latent) and out is not latent


def test_split_schedule_continues_where_it_stopped():
    # ComfyUI's SplitSigmas: a first sampler stops at σ_k and returns x/(1 − σ_k); a second continues without new
    # noise. With Euler (no history) the two halves must reproduce the single run.
    model, sigmas = TinyDiT(), flow_sigmas(8, 5.0)
    latent, positive = torch.zeros(1, 16, 2, 4, 4), tiny_context()
    whole = sample(model, latent, sigmas, positive, guidance=1.0, sampler="euler", seed=9)
    half = sample(model, latent, sigmas[:5], positive, guidance=1.0, sampler="euler", seed=9)
    rest = sample(model, half, sigmas[4:], positive, guidance=1.0, sampler="euler", seed=9, add_noise=False)
    torch.testing.assert_close(rest, whole, rtol=1e-5, atol=1e-5)


def test_sample_rejects_bad_inputs_clearly():
    model = TinyDiT()
    with pytest.raises(InputError, match="16, T, H, W"):
        sample(model, torch.zeros(1, 48, 2, 4, 4), flow_sigmas(4, 5.0), tiny_context())
    with pytest.raises(InputError, match="unknown sampler"):
        sample(model, torch.zeros(1, 16, 2, 4, 4), flow_sigmas(4, 5.0), tiny_context(), sampler="ddim")
    with pytest.raises(InputError, match="decrease"):
        sample(model, torch.zeros(1, 16, 2, 4, 4), flow_sigmas(4, 5.0).flip(0), tiny_context())
    with pytest.raises(InputError, match="negative"):
        sample(model, torch.zeros(1, 16, 2, 4, 4), flow_sigmas(4, 5.0), tiny_context(), None, guidance=5.0)
    with pytest.raises(InputError, match="config"):
        sample(lambda x, t, c: x, torch.zeros(1, 16, 2, 4, 4), flow_sigmas(4, 5.0), tiny_context())


def test_lcm_predicts_x0_and_noises_it_afresh_with_the_seed():
    from sora.solvers import LCM
    sigmas = [1.0, 0.6, 0.0]
    x, v = torch.randn(1, 2, 1, 2, 2), torch.randn(1, 2, 1, 2, 2)
    solver = LCM(sigmas, seed=5)
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # the first draw of the seed's stream
    torch.testing.assert_close(solver.step(0, x, v), 0.4 * (x - 1.0 * v) + 0.6 * fresh)
    torch.testing.assert_close(solver.step(1, x, v), x - 0.6 * v)  # the last step returns x0
