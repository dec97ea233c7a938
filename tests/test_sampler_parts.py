"""The sampler in parts and the model handle: each part alone, and the gaps of the sampler node they close.

- the solver loop (`solve`) with its step hooks, and an external sampler (`solve_with`) that equals our own Euler;
- a run split over two Sora Samplers (SplitSigmas halves, the second with add_noise off) equals one run;
- a CONDITIONING of several entries is combined as ComfyUI combines them: the weighted mean of each entry's pass;
- model handles: patches and wrappers never reach another handle on the same weights, strength 0 is the base.
"""
import pytest
import torch
from test_sampling_fakes import TinyDiT, tiny_context

from sora import ops, runtime
from sora.guidance import ClassifierFreeGuidance, Prompt
from sora.handle import ModelCall, ModelHandle, WeightPatch
from sora.nodes import frame_conditioning, loaders, sampling, text_encode
from sora.samplers import StepHooks, run_sampling, sample, solve
from sora.schedules import flow_sigmas
from sora.solvers import Euler

pytestmark = pytest.mark.usefixtures("fresh_manager")


# ---------------------------------------------------------------------------------------------------------------
# The parts alone
# ---------------------------------------------------------------------------------------------------------------

def test_the_solver_loop_calls_its_hooks_around_every_step_with_the_step_it_is_on():
    sigmas = [1.0, 0.6, 0.3, 0.0]
    seen, calls = [], []

    def velocity(x, timestep, call):
        calls.append((call.step, call.steps, call.sigma, float(timestep[0])))
        return torch.ones_like(x)
    noise, start = torch.randn(1, 2, 1, 2, 2), torch.zeros(1, 2, 1, 2, 2)
    x, x0 = solve(Euler(sigmas), velocity, noise, start,
                  hooks=StepHooks(before=lambda i: seen.append(("before", i)), after=lambda i, x0: seen.append(
                      ("after", i))))
    assert seen == [("before", 0), ("after", 0), ("before", 1), ("after", 1), ("before", 2), ("after", 2)]
    assert calls == [(0, 3, 1.0, 1000.0), (1, 3, 0.6, 600.0), (2, 3, 0.3, 300.0)]
    torch.testing.assert_close(x, noise - 1.0)  # Euler with v = 1 from σ = 1 to 0: x − 1
    torch.testing.assert_close(x0, x)  # the last prediction at σ = 0.3 is x − 0.3·v, which is where x ends


def euler_the_external_way(denoise, noise, start, sigmas, callback):
    """An external sampler written the k-diffusion way: noise added by the sampler, x0-predicting denoiser, the
    derivative (x − x0)/σ."""
    x = sigmas[0] * noise + (1 - sigmas[0]) * start
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        callback(i, x0)
        x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("masked", [False, True])
def test_an_external_sampler_drives_the_same_run(masked):
    model = TinyDiT(per_token=masked)
    latent = torch.randn(1, 16, 3, 4, 4) if masked else torch.zeros(1, 16, 3, 4, 4)
    mask = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1) if masked else None
    args = (model, latent, flow_sigmas(5, 5.0), tiny_context(), tiny_context(seed=1, length=3))
    ours = run_sampling(*args, guidance=4.0, sampler="euler", seed=3, noise_mask=mask)
    theirs = run_sampling(*args, guidance=4.0, sampler=euler_the_external_way, seed=3, noise_mask=mask)
    torch.testing.assert_close(theirs.latent, ours.latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.denoised, ours.denoised, rtol=1e-5, atol=1e-5)
    if masked:
        assert torch.equal(theirs.latent[:, :, 0], latent[:, :, 0])  # the kept frame, exactly


def test_several_prompts_per_side_are_their_weighted_mean():
    model = TinyDiT()
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([600.0])
    a, b, n = tiny_context(length=4), tiny_context(length=6, seed=1), tiny_context(length=3, seed=2)
    v_a, v_b, v_n = model(x, t, a), model(x, t, b), model(x, t, n)
    expected = v_n + 3.0 * ((1.0 * v_a + 3.0 * v_b) / 4.0 - v_n)
    for batched in (True, False):
        cfg = ClassifierFreeGuidance([Prompt(a, 1.0), Prompt(b, 3.0)], n, 1, batched=batched)
        torch.testing.assert_close(cfg.velocity(model, x, t, 3.0), expected, rtol=1e-5, atol=1e-5)
    one = ClassifierFreeGuidance([Prompt(a)], [Prompt(n)], 1)
    assert torch.equal(one.velocity(model, x, t, 3.0), ClassifierFreeGuidance(a, n, 1).velocity(model, x, t, 3.0))


# ---------------------------------------------------------------------------------------------------------------
# The handle
# ---------------------------------------------------------------------------------------------------------------

class FullDelta:
    """A full-weight delta: what a `.diff` patch is."""
    def __init__(self, diff):
        self.diff = diff

    def delta(self, strength, dtype):
        return (strength * self.diff).to(dtype)


class LowRank:
    """A low-rank delta with the attributes `sora.ops.Linear` applies on the activations."""
    def __init__(self, down, up, scale=1.0):
        self.down, self.up, self.scale, self.mid = down, up, scale, None

    def delta(self, strength, dtype):
        return (strength * self.scale * self.up.double() @ self.down.double()).to(dtype)


def tiny_dit():
    from sora.dit import DiTConfig, WanDiT
    model = WanDiT(DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=8, text_len=8, freq_dim=16))
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    return model.eval().requires_grad_(False)


def test_handles_on_one_model_compute_independently_and_leave_the_weights_alone():
    model = tiny_dit()
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 8)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = ModelHandle(model, "tiny")
    q, mod = model.blocks[0].self_attn.q.weight, model.blocks[1].modulation
    low_rank = LowRank(torch.randn(4, 32), torch.randn(32, 4) * 0.05, scale=0.5)
    lora = base.patched(WeightPatch("blocks.0.self_attn.q.weight", low_rank, 0.8),
                        WeightPatch("blocks.1.modulation", FullDelta(torch.randn_like(mod) * 0.1), -1.0))
    other = base.patched(WeightPatch("blocks.0.self_attn.q.weight", FullDelta(torch.randn_like(q) * 0.1), 1.0))
    plain = base(x, t, ctx)
    outputs = {"lora": lora(x, t, ctx), "other": other(x, t, ctx)}
    assert torch.equal(base(x, t, ctx), plain)  # the base handle is as it was, after both
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # no stored weight changed
    assert not any(ops.PATCHES in m.__dict__ for m in model.modules())  # nothing left installed

    # The oracle: the same model with the patches merged into its weights by hand.
    merged = tiny_dit()
    merged.load_state_dict(weights)
    with torch.no_grad():
        merged.blocks[0].self_attn.q.weight += 0.8 * 0.5 * low_rank.up @ low_rank.down
        merged.blocks[1].modulation -= lora.patches[1].delta.diff
    torch.testing.assert_close(outputs["lora"], merged(x, t, ctx), rtol=1e-5, atol=1e-6)
    assert not torch.equal(outputs["lora"], plain) and not torch.equal(outputs["other"], plain)


def test_strength_zero_is_the_base_bit_for_bit_and_wrappers_see_each_call():
    model = tiny_dit()
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 8)
    base = ModelHandle(model, "tiny")
    zero = base.patched(WeightPatch("blocks.0.ffn.0.weight", LowRank(torch.randn(2, 32), torch.randn(64, 2)), 0.0))
    assert torch.equal(zero(x, t, ctx), base(x, t, ctx))

    seen = []

    def outer(forward, x, t, ctx, call):
        seen.append(("outer", call))
        return forward(x, t, ctx, call) * 2

    def inner(forward, x, t, ctx, call):
        seen.append(("inner", call))
        return forward(x, t, ctx, call) + 1
    wrapped = base.wrapped(outer).wrapped(inner)
    call = ModelCall(3, 10, 0.4, ("cond",))
    assert torch.equal(wrapped(x, t, ctx, call), (base(x, t, ctx) + 1) * 2)  # outer first, inner next to the model
    assert seen == [("outer", call), ("inner", call)] and base.wrappers == ()


# ---------------------------------------------------------------------------------------------------------------
# Through the Sora Sampler node
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def nodes(models, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models)
    (model,) = loaders.SoraModelLoader().load("wan2.2_ti2v_5B_fp16.safetensors", "default", "auto", "sdpa",
                                              loaders.AUTO_EXPERT)
    (encoder,) = loaders.SoraTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "default", "auto")
    return model, encoder


def run_node(model, positive, negative, latent, sigmas, **options):
    values = dict(seed=11, guidance=4.0, sampler_name="euler", denoise=1.0) | options
    return sampling.SoraSampler().sample(model, positive, negative, latent, sigmas, **values)


@pytest.mark.parametrize("keep_frames", [False, True])
def test_two_samplers_over_split_sigmas_equal_one_run(nodes, keep_frames):
    model, encoder = nodes
    positive, negative = text_encode.SoraTextEncode().encode(encoder, "a red ball", "wan default", "")
    (latent,) = sampling.SoraEmptyLatentVideo().generate(model, 64, 32, 9, 1)
    if keep_frames:  # a clip whose first latent frame is kept (image to video)
        latent = frame_conditioning.SoraImageToVideo().condition({"samples": torch.randn(1, 48, 1, 2, 4)}, 9)[0]
    (sigmas,) = sampling.SoraScheduler().schedule(model, 6, 0.0, "wan_unipc", 1.0)
    high, low = sigmas[:4], sigmas[3:]  # core's SplitSigmas at step 3
    whole, _ = run_node(model, positive, negative, latent, sigmas)
    first, first_denoised = run_node(model, positive, negative, latent, high)
    second, _ = run_node(model, positive, negative, first, low, add_noise=False)
    torch.testing.assert_close(second["samples"], whole["samples"], rtol=0, atol=1e-6)
    assert (first["samples"] - whole["samples"]).abs().max() > 0.1  # the first half alone is far from done
    assert not torch.equal(first_denoised["samples"], first["samples"])  # denoised: its clean prediction
    noised_again, _ = run_node(model, positive, negative, first, low)  # add_noise on: noise over the partial result
    assert (noised_again["samples"] - whole["samples"]).abs().max() > 0.1


def test_a_combined_conditioning_runs_each_entry_and_averages(nodes):
    model, encoder = nodes
    encode = text_encode.SoraTextEncode().encode
    red, negative = encode(encoder, "a red ball", "wan default", "")
    blue, _ = encode(encoder, "a blue cube", "wan default", "")
    (latent,) = sampling.SoraEmptyLatentVideo().generate(model, 64, 32, 9, 1)
    (sigmas,) = sampling.SoraScheduler().schedule(model, 2, 0.0, "wan_unipc", 1.0)
    both = run_node(model, red + blue, negative, latent, sigmas, guidance=1.0)[0]["samples"]
    # Euler with guidance 1 takes the mean of the two velocities: one step by hand from the same noise.
    calls = []
    hook = model.model.register_forward_hook(lambda m, args, out: calls.append(args[2].shape[0]))
    try:
        run_node(model, red + blue, negative, latent, sigmas, guidance=1.0)
    finally:
        hook.remove()
    assert calls == [2, 2]  # both entries in one batched forward per step
    alone = [run_node(model, cond, negative, latent, sigmas, guidance=1.0)[0]["samples"] for cond in (red, blue)]
    assert not torch.allclose(both, alone[0]) and not torch.allclose(both, alone[1])
    reference = sample(model, latent["samples"], sigmas, [Prompt(red[0][0]), Prompt(blue[0][0])], None,
                       guidance=1.0, sampler="euler", seed=11)
    torch.testing.assert_close(both, reference, rtol=0, atol=1e-6)
