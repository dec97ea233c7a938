"""Schedules against diffusers' flow schedulers and the reference timesteps (ARCH_FACTS §4.2, §4.3, §4.9)."""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from sora.errors import InputError
from sora.guidance import expert_step_counts
from sora.schedules import DEFAULTS, custom_sigmas, flow_sigmas, linear_sigmas, shift_sigmas, split_denoise

CASES = [(50, 5.0), (40, 12.0), (40, 3.0), (30, 16.0), (8, 1.0)]


@pytest.mark.parametrize("steps, shift", CASES)
def test_wan_unipc_grid_equals_diffusers(steps, shift):
    ours = flow_sigmas(steps, shift, "wan_unipc")
    # diffusers' DPM-Solver with flow sigmas builds the reference UniPC grid itself ...
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                      final_sigmas_type="zero")
    dpm.set_timesteps(steps)
    assert torch.equal(ours, dpm.sigmas)
    # ... while its UniPC defaults to linspace(1, 1/1000) (a different grid by design, see schedules.py): given
    # the reference's unshifted points it shifts them exactly as we do.
    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    unipc.set_timesteps(sigmas=np.linspace(0.999, 0.0, steps + 1)[:-1])
    assert torch.equal(ours, unipc.sigmas)


@pytest.mark.parametrize("steps, shift", CASES)
def test_wan_dpm_grid_equals_flow_match_euler(steps, shift):
    ours = flow_sigmas(steps, shift, "wan_dpm")
    euler = FlowMatchEulerDiscreteScheduler(shift=shift)
    euler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    # FlowMatchEuler shifts in float32, we in float64 (as the reference): at most one float32 ulp apart.
    torch.testing.assert_close(ours, euler.sigmas, rtol=0, atol=1.2e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_diffusers_default_grids_differ_by_design_and_pass_through_custom_sigmas():
    steps, shift = 20, 5.0
    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    unipc.set_timesteps(steps)
    euler = FlowMatchEulerDiscreteScheduler(shift=shift)
    euler.set_timesteps(steps)
    for theirs in (unipc.sigmas, euler.sigmas):
        assert not torch.allclose(theirs, flow_sigmas(steps, shift, "wan_unipc"), atol=1e-4)
        assert not torch.allclose(theirs, flow_sigmas(steps, shift, "wan_dpm"), atol=1e-4)
        assert torch.equal(custom_sigmas(theirs), theirs)  # any of them can still be used, unchanged


def test_reference_timesteps():
    # ARCH_FACTS §4.2 lists the reference's int64 timesteps for 50 steps at shift 5.
    t = (flow_sigmas(50, 5.0)[:-1].double() * 1000).long().tolist()
    assert t[:5] == [999, 995, 991, 987, 982]
    assert t[-5:] == [356, 302, 241, 172, 92]
    assert (flow_sigmas(40, 3.0)[[0, 1, 2, -2]].double() * 1000).long().tolist() == [999, 991, 982, 71]
    assert (flow_sigmas(40, 12.0)[[0, 1, 2, -2]].double() * 1000).long().tolist() == [999, 997, 995, 235]


def test_shift_formula_by_hand():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert shift_sigmas(sigma, 3.0).tolist() == [0.0, 0.75 / 1.5, 1.5 / 2.0, 1.0]
    assert linear_sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_denoise_keeps_the_tail_like_basic_scheduler():
    # ComfyUI's BasicScheduler: build int(steps / denoise) steps and keep the last `steps`.
    for schedule in ("wan_unipc", "wan_dpm", "linear"):
        torch.testing.assert_close(flow_sigmas(10, 5.0, schedule, denoise=0.5),
                                   flow_sigmas(20, 5.0, schedule)[-11:], rtol=0, atol=0)
        assert len(flow_sigmas(7, 5.0, schedule, denoise=0.3)) == 8
    assert len(flow_sigmas(10, 5.0, denoise=0.0)) == 0


def test_split_denoise_like_split_sigmas_denoise():
    sigmas = flow_sigmas(10, 5.0)
    assert torch.equal(split_denoise(sigmas, 1.0), sigmas)
    assert torch.equal(split_denoise(sigmas, 0.4), sigmas[-5:])
    assert len(split_denoise(sigmas, 0.0)) == 0


def test_custom_sigmas_parse_and_validate():
    assert custom_sigmas("1.0, 0.8 0.4").tolist() == pytest.approx([1.0, 0.8, 0.4, 0.0])
    assert custom_sigmas([0.9, 0.2, 0.0]).tolist() == pytest.approx([0.9, 0.2, 0.0])
    for bad, words in [("1, 0.5, 0.7", "decrease"), ("1.5, 0", "[0, 1]"), ("a, b", "numbers"), ("", "empty")]:
        with pytest.raises(InputError, match=words):
            custom_sigmas(bad)


def test_bad_schedule_inputs_explain_themselves():
    with pytest.raises(InputError, match="schedule"):
        flow_sigmas(10, 5.0, "karras")
    with pytest.raises(InputError, match="steps"):
        flow_sigmas(0, 5.0)
    with pytest.raises(InputError, match="shift"):
        flow_sigmas(10, 0.0)
    with pytest.raises(InputError, match="denoise"):
        flow_sigmas(10, 5.0, denoise=1.5)


def test_sigmas_interoperate_with_core_sigma_nodes():
    sigmas = flow_sigmas(12, 5.0)
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1 and sigmas[-1] == 0
    high, low = sigmas[:5], sigmas[4:]  # SplitSigmas at step 4 shares the boundary sigma
    assert torch.equal(torch.cat([high, low[1:]]), sigmas)
    assert torch.equal(sigmas.flip(0).flip(0), sigmas)


@pytest.mark.parametrize("task", ["wan22_t2v_a14b", "wan22_i2v_a14b"])
def test_expert_counts_follow_the_reference_rule(task):
    defaults = DEFAULTS[task]
    sigmas = flow_sigmas(defaults.steps, defaults.shift)
    # The reference compares the int64 timestep with boundary_t; diffusers' DPM-Solver truncates the same grid.
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=defaults.shift,
                                      prediction_type="flow_prediction", final_sigmas_type="zero")
    dpm.set_timesteps(defaults.steps)
    reference_high = int((dpm.timesteps >= defaults.boundary_t).sum())
    assert expert_step_counts(sigmas, defaults.boundary_t) == (reference_high, defaults.steps - reference_high)
    # ARCH_FACTS §4.9's worked counts.
    assert expert_step_counts(sigmas, defaults.boundary_t) == {"wan22_t2v_a14b": (26, 14),
                                                               "wan22_i2v_a14b": (15, 25)}[task]


def test_the_distill_schedule_is_the_published_four_step_grid():
    # lightx2v: timesteps 1000, 750, 500, 250 on the shift-5 grid (ECOSYSTEM_FACTS §2.1), by hand: 5σ/(1 + 4σ)
    expected = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(flow_sigmas(4, 5.0, "distill"), torch.tensor(expected), rtol=0, atol=1e-7)
    assert [round(float(s), 4) for s in flow_sigmas(4, 5.0, "distill")] == [1.0, 0.9375, 0.8333, 0.625, 0.0]
