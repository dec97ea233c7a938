"""Step caches (TeaCache, MagCache, EasyCache) and cheaper guidance (cfg_end, CFG-Zero*), on a tiny random DiT
through the real sampler: threshold 0 is the plain model bit for bit, skipping happens on a slowly changing input
but never on the first or last step, the guidance passes keep separate state, and the caches work with known
frames, per-token timesteps, the expert hand-off, LoRA patches and block streaming."""
import dataclasses
import inspect
import json
import logging

import pytest
import torch

from sora import guidance, memory, samplers, step_cache
from sora.dit import PRESETS, WanDiT
from sora.handle import HIGH_NOISE, LOW_NOISE, ModelCall, ModelHandle, WeightPatch
from sora.schedules import flow_sigmas

pytestmark = pytest.mark.usefixtures("fresh_manager")  # a memory manager of this module's own

METHODS = step_cache.METHODS
SHAPE = (1, 16, 3, 4, 4)  # [B, C, T, H, W]: 3 latent frames of 2x2 patches


def tiny_dit(per_token: bool = False, seed: int = 0) -> WanDiT:
    model = WanDiT(dataclasses.replace(PRESETS["tiny"], per_token_timesteps=per_token)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # a fresh WanDiT has a zero head; give every weight a value
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def context(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(1, rows, 24, generator=torch.Generator().manual_seed(seed))


POSITIVE, NEGATIVE = context(5, 1), context(7, 2)


def flat_ratios(steps: int = 50) -> step_cache.MagnitudeRatios:
    """Ratios of a model whose residual keeps its size: magcache then skips up to its limit."""
    return step_cache.MagnitudeRatios({"cond": (1.0,) * steps, "uncond": (1.0,) * steps}, "test")


def cache_for(handle: ModelHandle, method: str, threshold: float, **settings) -> step_cache.StepCache:
    options = dict(start=0.0, end=1.0)
    options.update(settings)
    config = step_cache.CacheSettings(method, threshold, **options)
    cache = step_cache.step_cache(handle, config) if method != "magcache" else step_cache.StepCache(
        config, model=handle.name, patch=handle.config.patch_size, out_dim=handle.config.out_dim,
        eps=handle.config.eps, ratios=flat_ratios())
    return cache


def run(model, steps: int = 12, **options) -> torch.Tensor:
    options.setdefault("guidance", 4.0)
    return samplers.sample(model, torch.zeros(SHAPE), flow_sigmas(steps, 5.0), POSITIVE, NEGATIVE, seed=3,
                           sampler="euler", **options)


class BlockRuns:
    """Which steps ran the transformer blocks: an outer wrapper notes the step, block 0 records it."""

    def __init__(self, model: WanDiT):
        self.step, self.steps = None, []
        model.blocks[0].register_forward_pre_hook(lambda module, args: self.steps.append(self.step))

    def __call__(self, forward, x, timestep, context, call, **conditions):
        self.step = None if call is None else call.step
        return forward(x, timestep, context, call, **conditions)


# ---------------------------------------------------------------------------------------------------------------
# Exactness and the skipping window
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_threshold_zero_reproduces_the_uncached_output_exactly(method):
    model = tiny_dit()
    handle = ModelHandle(model, "tiny")
    plain = run(handle)
    cache = cache_for(handle, method, 0.0)
    assert torch.equal(run(handle.wrapped(cache)), plain)
    assert cache.last_report.skipped == 0 and cache.last_report.run == 24  # 12 steps x (cond, uncond)


@pytest.mark.parametrize("method", METHODS)
def test_skips_on_a_slowly_changing_input_but_never_the_first_or_last_step(method):
    model = tiny_dit()
    runs = BlockRuns(model)
    handle = ModelHandle(model, "tiny").wrapped(runs)
    cache = cache_for(handle, method, 10.0)  # any change is small enough: only the rules' own limits hold
    out = run(handle.wrapped(cache), steps=12)
    report = cache.last_report
    assert report.skipped >= 1 and report.run + report.skipped == 24
    assert torch.isfinite(out).all()
    ran = set(runs.steps)
    assert {0, 11} <= ran and len(ran) < 12  # the first and the last step always run, others are skipped
    if method != "magcache":
        assert len(runs.steps) == report.run // 2  # one batched forward per computed step (cond and uncond)


def test_start_and_end_bound_the_window():
    settings = step_cache.CacheSettings("teacache", 0.1, start=0.25, end=0.75)
    allowed = [i for i in range(20) if settings.may_skip(i, 20)]
    assert allowed == list(range(5, 15))
    everywhere = step_cache.CacheSettings("teacache", 0.1, start=0.0, end=1.0)
    assert [i for i in range(4) if everywhere.may_skip(i, 4)] == [1, 2]
    assert not any(everywhere.may_skip(i, n) for n in (1, 2) for i in range(n))


def test_a_lower_threshold_skips_less():
    handle = ModelHandle(tiny_dit(), "tiny")
    skipped = []
    for threshold in (0.02, 0.2, 2.0):
        cache = cache_for(handle, "easycache", threshold)
        run(handle.wrapped(cache), steps=16)
        skipped.append(cache.last_report.skipped)
    assert skipped == sorted(skipped) and skipped[0] < skipped[-1]


def test_magcache_skips_at_most_max_skips_in_a_row():
    model = tiny_dit()
    runs = BlockRuns(model)
    handle = ModelHandle(model, "tiny").wrapped(runs)
    cache = cache_for(handle, "magcache", 10.0, max_skips=2)
    run(handle.wrapped(cache), steps=12)
    gaps = [b - a - 1 for a, b in zip(runs.steps, runs.steps[1:])]
    assert max(gaps) == 2 and runs.steps[0] == 0 and runs.steps[-1] == 11


# ---------------------------------------------------------------------------------------------------------------
# Separate state per guidance pass and per model
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("method", ["teacache", "magcache"])
def test_cond_and_uncond_keep_separate_residuals(method):
    # One cache over batched (cond, uncond) calls gives what two caches give that each see one pass alone: had
    # the passes shared their state, the uncond half of a skipped step would carry the cond residual.
    model = tiny_dit()
    base = ModelHandle(model, "tiny")
    both = base.wrapped(cache_for(base, method, 10.0))
    alone = {name: base.wrapped(cache_for(base, method, 10.0)) for name in ("cond", "uncond")}
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    contexts = guidance.pad_context(POSITIVE, 7), NEGATIVE
    steps = 8
    for i in range(steps):
        x = x * 0.98  # a slowly changing input
        sigma = 1.0 - i / steps
        t = torch.full((1,), sigma * 1000)
        batched = both(torch.cat([x, x]), torch.cat([t, t]), torch.cat(contexts),
                       ModelCall(i, steps, sigma, ("cond", "uncond")))
        single = [alone[name](x, t, c, ModelCall(i, steps, sigma, (name,)))
                  for name, c in zip(("cond", "uncond"), contexts)]
        torch.testing.assert_close(batched, torch.cat(single), rtol=1e-5, atol=1e-6)
    cache = both.wrappers[0]
    cond, uncond = cache.states[("cond", 0)], cache.states[("uncond", 0)]
    assert cond is not uncond and cond.skipped >= 1 and cond.skipped == uncond.skipped
    assert not torch.allclose(cond.residual, uncond.residual)
@torch.no_grad()
def test_easycache_skipped_passes_use_their_own_residual():
    def fake(x, timestep, context, **conditions):  # velocity of each pass: its context's mean, plus a bit of x
        return 0.1 * x + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)

    fake.config = PRESETS["tiny"]
    handle = ModelHandle(fake, "fake")
    cache = step_cache.step_cache(handle, step_cache.CacheSettings("easycache", 10.0, start=0.0, end=1.0))
    cached = handle.wrapped(cache)
    x = torch.ones(SHAPE)
    contexts = torch.cat([torch.full((1, 3, 24), 1.0), torch.full((1, 3, 24), -2.0)])
    for i in range(5):
        x = x * 0.99
        out = cached(torch.cat([x, x]), torch.full((2,), 500.0), contexts, ModelCall(i, 10, 0.5, ("cond", "uncond")))
    cond, uncond = cache.states[("cond", 0)], cache.states[("uncond", 0)]
    assert cond.skipped >= 1 and uncond.skipped == cond.skipped
    last_x_cond, last_v_cond = cond.computed
    last_x_uncond, last_v_uncond = uncond.computed
    torch.testing.assert_close(out[:1], x + (last_v_cond - last_x_cond))
    torch.testing.assert_close(out[1:], x + (last_v_uncond - last_x_uncond))
    assert not torch.allclose(out[:1], out[1:])


def test_each_expert_keeps_its_own_cache():
    high, low = ModelHandle(tiny_dit(seed=1), "high", HIGH_NOISE), ModelHandle(tiny_dit(seed=2), "low", LOW_NOISE)
    caches = [cache_for(h, "teacache", 10.0) for h in (high, low)]
    out = run(high.wrapped(caches[0]), steps=12, low_noise_model=low.wrapped(caches[1]), boundary_t=850.0)
    plain = run(high, steps=12, low_noise_model=low, boundary_t=850.0)
    reports = [c.last_report for c in caches]
    high_steps, low_steps = guidance.expert_step_counts(flow_sigmas(12, 5.0), 850.0)
    assert [r.run + r.skipped for r in reports] == [2 * high_steps, 2 * low_steps]
    assert all(r.skipped >= 1 for r in reports) and torch.isfinite(out).all() and not torch.equal(out, plain)
    assert all(not c.states for c in caches)  # the run's state is forgotten when it ends


def test_a_new_run_starts_from_fresh_state():
    handle = ModelHandle(tiny_dit(), "tiny")
    cache = cache_for(handle, "easycache", 0.3)
    cached = handle.wrapped(cache)
    first, second = run(cached), run(cached)
    assert torch.equal(first, second) and cache.last_report.skipped >= 1


# ---------------------------------------------------------------------------------------------------------------
# Known frames, per-token timesteps, LoRAs, streaming
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_token", [False, True])
def test_known_frames_stay_exact_and_steps_are_skipped(method, per_token):
    handle = ModelHandle(tiny_dit(per_token), "tiny")
    latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(1, 1, 3, 4, 4)
    mask[:, :, 0] = 0  # keep the first latent frame
    cache = cache_for(handle, method, 10.0)
    out = samplers.sample(handle.wrapped(cache), latent, flow_sigmas(10, 5.0), POSITIVE, NEGATIVE, guidance=4.0,
                          seed=1, noise_mask=mask)
    assert torch.equal(out[:, :, 0], latent[:, :, 0]) and cache.last_report.skipped >= 1
    zero = cache_for(handle, method, 0.0)
    plain = samplers.sample(handle, latent, flow_sigmas(10, 5.0), POSITIVE, NEGATIVE, guidance=4.0, seed=1,
                            noise_mask=mask)
    assert torch.equal(samplers.sample(handle.wrapped(zero), latent, flow_sigmas(10, 5.0), POSITIVE, NEGATIVE,
                                       guidance=4.0, seed=1, noise_mask=mask), plain)


def test_per_token_timesteps_give_each_token_its_own_modulation():
    x = torch.zeros(2, 16, 3, 4, 4)
    per_frame = torch.tensor([[0.0, 500.0, 500.0], [0.0, 500.0, 500.0]])
    index = step_cache.token_timestep_index(per_frame, x, (1, 2, 2))
    assert index.shape == (2, 12) and index[:, :4].eq(0).all() and index[:, 4:].eq(1).all()
    assert step_cache.token_timestep_index(torch.tensor([700.0, 700.0]), x, (1, 2, 2)).shape == (2, 1)


@pytest.mark.parametrize("method", ["teacache", "easycache"])
def test_a_lora_patched_model_caches_like_its_plain_self(method):
    class Delta:
        def __init__(self, shape):
            self.value = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.05

        def delta(self, strength, dtype):
            return (self.value * strength).to(dtype)

    model = tiny_dit()
    patch = WeightPatch("blocks.0.self_attn.q.weight", Delta(model.blocks[0].self_attn.q.weight.shape), 1.0)
    patched = ModelHandle(model, "tiny").patched(patch)
    plain = run(patched)
    assert not torch.equal(plain, run(ModelHandle(model, "tiny")))
    assert torch.equal(run(patched.wrapped(cache_for(patched, method, 0.0))), plain)
    cache = cache_for(patched, method, 10.0)
    assert torch.isfinite(run(patched.wrapped(cache))).all() and cache.last_report.skipped >= 1


@pytest.mark.parametrize("method", METHODS)
def test_block_streaming_with_a_cache(method):
    model = tiny_dit()
    streamed = ModelHandle(model, "tiny").with_memory(blocks_resident=1)
    plain = run(ModelHandle(model, "tiny"))
    assert torch.equal(run(streamed.wrapped(cache_for(streamed, method, 0.0))), plain)
    assert memory.get_manager().state(model).location == "streamed"
    cache = cache_for(streamed, method, 10.0)
    assert torch.isfinite(run(streamed.wrapped(cache))).all() and cache.last_report.skipped >= 1


# ---------------------------------------------------------------------------------------------------------------
# MagCache's ratios and TeaCache's coefficients
# ---------------------------------------------------------------------------------------------------------------

def test_magcache_calibrates_once_and_reads_its_file(tmp_path):
    handle = ModelHandle(tiny_dit(), "tiny")
    path = tmp_path / "tiny.safetensors.magcache.json"
    with pytest.raises(step_cache.InputError, match="calibrate"):
        step_cache.step_cache(handle, step_cache.CacheSettings("magcache", 0.1), ratios_file=path)
    calibrate = step_cache.step_cache(handle, step_cache.CacheSettings("magcache", 0.1, calibrate=True),
                                      ratios_file=path)
    plain = run(handle)
    assert torch.equal(run(handle.wrapped(calibrate)), plain)  # calibration skips nothing
    assert calibrate.last_report.skipped == 0 and str(path) in calibrate.last_report.text()
    stored = json.loads(path.read_text())
    assert stored["format"] == step_cache.RATIOS_FORMAT and stored["steps"] == 12
    assert set(stored["ratios"]) == {"cond", "uncond"} and len(stored["ratios"]["cond"]) == 12
    assert stored["ratios"]["cond"][0] == 1.0 and all(r > 0 for r in stored["ratios"]["uncond"])
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left behind
    cache = step_cache.step_cache(handle, step_cache.CacheSettings("magcache", 0.5, start=0.0), ratios_file=path)
    run(handle.wrapped(cache))
    assert cache.last_report.skipped >= 1 and path.name in cache.describe()


def test_magcache_tables_resample_by_nearest_step():
    ratios = step_cache.MagnitudeRatios.interleaved(step_cache.MAGCACHE_RATIOS["wan21_t2v_1.3b"], "published")
    assert len(ratios.passes["cond"]) == len(ratios.passes["uncond"]) == 50
    assert ratios.at("cond", 0, 50) == 1.0 and ratios.at("uncond", 49, 50) == 0.81939
    assert ratios.at("cond", 24, 25) == ratios.at("cond", 49, 50) and ratios.at("cond", 12, 25) == \
        ratios.passes["cond"][round(12 * 49 / 24)]
    partial = step_cache.MagnitudeRatios({"cond": (1.0, 0.99, None, None)})
    assert partial.at("cond", 3, 4) is None  # a step the calibration did not see: never skipped


def test_published_tables_are_found_by_model():
    def handle_of(config, name="model.safetensors", expert="single model"):
        with torch.device("meta"):  # shapes only
            return ModelHandle(WanDiT(dataclasses.replace(config, num_layers=1)), name, expert)

    assert step_cache.published_model(handle_of(PRESETS["wan21_t2v_1_3b"])) == "wan21_t2v_1.3b"
    assert step_cache.published_model(handle_of(PRESETS["wan21_i2v_14b"], "wan2.1_i2v_720p_14B.safetensors")) \
        == "wan21_i2v_720p"
    assert step_cache.published_model(handle_of(PRESETS["wan21_t2v_14b"], expert=HIGH_NOISE)) is None  # Wan 2.2
    assert step_cache.published_model(handle_of(PRESETS["tiny"])) is None
    cache = step_cache.step_cache(handle_of(PRESETS["wan21_t2v_1_3b"]), step_cache.CacheSettings("teacache", 0.1))
    assert cache.coefficients == step_cache.TEACACHE_COEFFICIENTS["wan21_t2v_1.3b"]
    assert step_cache.polynomial((2.0, -1.0, 3.0), 2.0) == 9.0


def test_settings_are_checked():
    for bad in (dict(method="deepcache"), dict(threshold=-1.0), dict(start=0.8, end=0.2),
                dict(method="teacache", calibrate=True), dict(max_skips=-1)):
        with pytest.raises(step_cache.InputError):
            step_cache.CacheSettings(**bad)
    assert step_cache.CacheSettings("magcache").max_skips == 4 and step_cache.CacheSettings().max_skips == 0


# ---------------------------------------------------------------------------------------------------------------
# Cheaper guidance
# ---------------------------------------------------------------------------------------------------------------

class Passes:
    """Counts the guidance passes the model runs."""

    def __init__(self):
        self.calls = []

    def __call__(self, forward, x, timestep, context, call, **conditions):
        self.calls.append((call.step, call.passes))
        return forward(x, timestep, context, call, **conditions)


def test_cfg_end_one_equals_plain_guidance_bit_for_bit():
    handle = ModelHandle(tiny_dit(), "tiny")
    assert torch.equal(run(handle, cfg_end=1.0), run(handle))


def test_cfg_end_runs_the_cond_pass_alone_after_it():
    handle = ModelHandle(tiny_dit(), "tiny")
    passes = Passes()
    out = run(handle.wrapped(passes), steps=10, cfg_end=0.3)
    assert [p for _, p in passes.calls] == [("cond", "uncond")] * 3 + [("cond",)] * 7
    assert not torch.equal(out, run(handle, steps=10))
    with pytest.raises(guidance.InputError, match="cfg_end"):
        run(handle, cfg_end=1.5)


def test_cfg_zero_star_scale_is_the_least_squares_fit():
    v_cond, v_uncond = torch.randn(3, 16, 2, 4, 4), torch.randn(3, 16, 2, 4, 4)
    scale = guidance.optimized_scale(v_cond, v_uncond)
    for b in range(3):
        fit = torch.linalg.lstsq(v_uncond[b].reshape(-1, 1), v_cond[b].reshape(-1, 1)).solution
        torch.testing.assert_close(scale[b].reshape(1, 1), fit, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(guidance.optimized_scale(v_cond, v_cond), torch.ones(3, 1, 1, 1, 1))
@torch.no_grad()
def test_cfg_zero_star_guides_with_the_scaled_uncond_and_zero_init_runs_no_forward():
    handle = ModelHandle(tiny_dit(), "tiny")
    cfg = guidance.ClassifierFreeGuidance(POSITIVE, NEGATIVE, 1, zero_star=True)
    x, t = torch.randn(SHAPE), torch.full((1,), 700.0)
    v = cfg.velocity(handle, x, t, 4.0)
    v_cond, v_uncond = cfg.last
    s = guidance.optimized_scale(v_cond, v_uncond)
    torch.testing.assert_close(v, s * v_uncond + 4.0 * (v_cond - s * v_uncond))
    passes = Passes()
    out = run(handle.wrapped(passes), steps=8, cfg_zero_star=True, zero_init_steps=2)
    assert [s for s, _ in passes.calls] == list(range(2, 8)) and torch.isfinite(out).all()
    assert not torch.equal(out, run(handle, steps=8))


# ---------------------------------------------------------------------------------------------------------------
# Off by default, the report, the node
# ---------------------------------------------------------------------------------------------------------------

def test_every_speed_feature_is_off_by_default():
    defaults = {n: p.default for n, p in inspect.signature(samplers.run_sampling).parameters.items()}
    assert defaults["cfg_end"] == 1.0 and defaults["cfg_zero_star"] is False and defaults["zero_init_steps"] == 0
    handle = ModelHandle(tiny_dit(), "tiny")
    explicit = run(handle, cfg_end=1.0, cfg_zero_star=False, zero_init_steps=0)
    assert torch.equal(run(handle), explicit) and handle.wrappers == ()
    from sora.nodes import load_node_mappings
    from sora.workflow import node_spec
    optional = node_spec(load_node_mappings()[0]["SoraSampler"]).inputs
    assert optional["cfg_end"].options["default"] == 1.0 and optional["cfg_zero_star"].options["default"] is False
    assert optional["zero_init_steps"].options["default"] == 0


def test_the_node_wraps_the_model_and_the_run_reports_what_it_skipped(caplog):
    from sora.nodes.speed import SoraStepCache
    handle = ModelHandle(tiny_dit(), "tiny")
    result = SoraStepCache().apply(handle, "easycache", 0.3, 0.0, 1.0)
    cached = result["result"][0]
    assert cached is not handle and handle.wrappers == () and "easycache" in result["ui"]["text"][0]
    with caplog.at_level(logging.INFO, logger="sora.step_cache"):
        run(cached)
    report = cached.wrappers[0].last_report
    assert report.skipped >= 1
    assert f"skipped {report.skipped} of 24 forwards" in caplog.text and "cond" in caplog.text
    with pytest.raises(step_cache.InputError, match="Sora Step Cache: input 'method'"):
        SoraStepCache().apply(handle, "magcache", 0.1, 0.2, 1.0)
    with pytest.raises(step_cache.InputError, match="Sora Step Cache: input 'start'"):
        SoraStepCache().apply(handle, "easycache", 0.1, 0.9, 0.2)
@torch.no_grad()
def test_calls_outside_a_sampler_pass_through():
    handle = ModelHandle(tiny_dit(), "tiny")
    cache = cache_for(handle, "easycache", 10.0)
    x, t = torch.randn(SHAPE), torch.full((1,), 500.0)
    for _ in range(3):
        assert torch.equal(handle.wrapped(cache)(x, t, POSITIVE), handle(x, t, POSITIVE))
    assert not cache.states
