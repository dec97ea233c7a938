"""Guidance, the two-expert hand-off, per-step callbacks, interrupts and latent previews."""
import gc
import weakref

import pytest
import torch
from test_sampling_fakes import TinyDiT, tiny_context

from sora.errors import InputError, Interrupted
from sora.guidance import ClassifierFreeGuidance, expert_step_counts, guidance_scales
from sora.latent_formats import WAN21, WAN22
from sora.preview import latent_to_rgb, preview_frame
from sora.samplers import sample
from sora.schedules import flow_sigmas


def test_batched_guidance_equals_sequential():
    model = TinyDiT()
    x, t = torch.randn(2, 16, 3, 4, 4), torch.tensor([700.0, 700.0])
    positive, negative = tiny_context(2, 7), tiny_context(2, 3, seed=1)  # different lengths must batch
    batched = ClassifierFreeGuidance(positive, negative, 2, batched=True).velocity(model, x, t, 5.0)
    sequential = ClassifierFreeGuidance(positive, negative, 2, batched=False).velocity(model, x, t, 5.0)
    torch.testing.assert_close(batched, sequential, rtol=1e-6, atol=1e-6)
    # Against the formula, computed by hand on unpadded contexts.
    v_cond, v_uncond = model(x, t, positive), model(x, t, negative)
    torch.testing.assert_close(batched, v_uncond + 5.0 * (v_cond - v_uncond), rtol=1e-6, atol=1e-6)


def test_batched_and_sequential_runs_agree_and_differ_in_calls():
    runs = {}
    for batched in (True, False):
        model = TinyDiT()
        model.record = True
        runs[batched] = sample(model, torch.zeros(1, 16, 2, 4, 4), flow_sigmas(4, 5.0), tiny_context(),
                               tiny_context(length=9, seed=2), guidance=6.0, batched_cfg=batched)
        assert len(model.calls) == (4 if batched else 8)
        assert model.calls[0][0].shape[0] == (2 if batched else 1)
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-6, atol=1e-6)


def test_single_context_broadcasts_over_the_batch():
    model = TinyDiT()
    x, t = torch.randn(3, 16, 2, 4, 4), torch.full((3,), 400.0)
    one = ClassifierFreeGuidance(tiny_context(1), tiny_context(1, seed=1), 3).velocity(model, x, t, 2.0)
    three = ClassifierFreeGuidance(tiny_context(1).expand(3, -1, -1), tiny_context(1, seed=1).expand(3, -1, -1),
                                   3).velocity(model, x, t, 2.0)
    assert torch.equal(one, three)
    with pytest.raises(InputError, match="batch"):
        ClassifierFreeGuidance(tiny_context(2), None, 3)
    with pytest.raises(InputError, match="width"):
        ClassifierFreeGuidance(tiny_context(1), tiny_context(1, width=4), 1)


def test_per_step_guidance_scales():
    assert guidance_scales(4.0, 3) == [4.0, 4.0, 4.0]
    assert guidance_scales(torch.tensor([5.0, 3.0, 1.0]), 3) == [5.0, 3.0, 1.0]
    with pytest.raises(InputError, match="one value per step"):
        guidance_scales([5.0, 3.0], 3)
    # Scale 1 at a step skips the unconditional pass; per-step scales must match a run with those scales fixed.
    model = TinyDiT()
    model.record = True
    latent, positive, negative = torch.zeros(1, 16, 2, 4, 4), tiny_context(), tiny_context(seed=1)
    varying = sample(model, latent, flow_sigmas(3, 5.0), positive, negative, guidance=[5.0, 3.0, 1.0],
                     sampler="euler")
    assert [call[0].shape[0] for call in model.calls] == [2, 2, 1]
    constant = sample(TinyDiT(), latent, flow_sigmas(3, 5.0), positive, negative, guidance=5.0, sampler="euler")
    assert not torch.equal(varying, constant)


@pytest.mark.parametrize("steps, shift, boundary, expected", [(40, 12.0, 875.0, (26, 14)), (40, 5.0, 900.0, (15, 25))])
def test_expert_hand_off_switches_at_the_boundary(steps, shift, boundary, expected):
    high, low = TinyDiT(seed=0), TinyDiT(seed=1)
    high.record = low.record = True
    sigmas = flow_sigmas(steps, shift)
    sample(high, torch.zeros(1, 16, 1, 2, 2), sigmas, tiny_context(), guidance=1.0, low_noise_model=low,
           boundary_t=boundary)
    assert (len(high.calls), len(low.calls)) == expected == expert_step_counts(sigmas, boundary)
    assert min(call[1].item() for call in high.calls) >= boundary > max(call[1].item() for call in low.calls)


def test_experts_share_the_solver_state_and_have_their_own_guidance():
    # Two copies of one model must give exactly the single-model run: UniPC's history crosses the hand-off.
    latent, sigmas = torch.zeros(1, 16, 2, 4, 4), flow_sigmas(10, 12.0)
    positive, negative = tiny_context(), tiny_context(seed=1)
    single = sample(TinyDiT(), latent, sigmas, positive, negative, guidance=4.0)
    pair = sample(TinyDiT(), latent, sigmas, positive, negative, guidance=4.0, low_noise_model=TinyDiT())
    assert torch.equal(single, pair)
    # The low-noise expert's own scale equals a per-step list that switches at the boundary.
    high_steps, low_steps = expert_step_counts(sigmas, 875.0)
    own = sample(TinyDiT(), latent, sigmas, positive, negative, guidance=4.0, low_noise_model=TinyDiT(),
                 low_noise_guidance=3.0)
    listed = sample(TinyDiT(), latent, sigmas, positive, negative, guidance=[4.0] * high_steps + [3.0] * low_steps)
    assert torch.equal(own, listed) and not torch.equal(own, single)
    with pytest.raises(InputError, match="experts"):
        sample(TinyDiT(), latent, sigmas, positive, low_noise_model=TinyDiT(per_token=True))


def test_callback_reports_every_step_with_the_x0_prediction():
    seen = []
    out = sample(TinyDiT(), torch.zeros(1, 16, 2, 4, 4), flow_sigmas(5, 5.0), tiny_context(), guidance=1.0,
                 sampler="euler", callback=lambda step, total, x0: seen.append((step, total, x0)))
    assert [(step, total) for step, total, _ in seen] == [(i, 5) for i in range(1, 6)]
    # The last Euler step lands on the x0 prediction made at its start: the final preview is the result.
    torch.testing.assert_close(seen[-1][2], out, rtol=1e-6, atol=1e-6)


def test_interrupt_stops_within_one_step_and_frees_the_run():
    model = TinyDiT()
    held = []
    forward = model.forward

    def watched(x, t, context):
        v = forward(x, t, context)
        held.extend([weakref.ref(x), weakref.ref(v)])
        return v
    model.forward = watched
    checks = {"n": 0}

    def interrupt():
        checks["n"] += 1
        if checks["n"] == 3:
            raise Interrupted("cancelled by the user")

    with pytest.raises(Interrupted, match="cancelled") as stopped:
        # Guidance 1: the model sees the sampler's own x and its output is the sampler's v.
        sample(model, torch.zeros(1, 16, 2, 8, 8), flow_sigmas(10, 5.0), tiny_context(), guidance=1.0,
               interrupt=interrupt)
    assert len(held) == 2 * 2  # two steps ran, the third never started
    gc.collect()
    assert stopped.value is not None  # the caller still holds the exception ...
    assert all(ref() is None for ref in held)  # ... but not the run's tensors


def test_preview_applies_the_family_colours():
    # A latent whose normalised value is 1 in channel c and 0 elsewhere previews as (factors[c] + bias + 1) / 2.
    for fmt in (WAN21, WAN22):
        c = 3
        normalised = torch.zeros(1, fmt.channels, 2, 3, 5)
        normalised[:, c] = 1.0
        rgb = latent_to_rgb(fmt.denormalize(normalised), fmt)
        assert rgb.shape == (1, 2, 3, 5, 3)
        expected = (torch.tensor(fmt.rgb_factors[c]) + torch.tensor(fmt.rgb_bias) + 1) / 2
        torch.testing.assert_close(rgb[0, 1, 2, 4], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(preview_frame(fmt.denormalize(normalised), fmt.name, frame=-1), rgb[0, -1])
    assert latent_to_rgb(torch.full((1, 16, 1, 2, 2), 1e3), "wan21").max() <= 1.0


def test_preview_errors():
    with pytest.raises(InputError, match="latent format"):
        latent_to_rgb(torch.zeros(1, 16, 1, 2, 2), "sdxl")
    with pytest.raises(InputError, match="48"):
        latent_to_rgb(torch.zeros(1, 16, 1, 2, 2), "wan22")
