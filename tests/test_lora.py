"""LoRAs on model handles: applied on the fly in every layout and weight format, never touching the shared weights.

The oracle is the hand-derived merge `W + s·(up @ down)` (or `W + s·diff`) of `sora.lora.apply_to_state_dict` on
the same base weights; `tests/test_lora_keys.py` holds that oracle and our handles against diffusers + PEFT for the
layouts diffusers converts.
"""
import json

import pytest
import torch
from safetensors.torch import save_file
from test_lora_keys import BLOCK_LINEARS, CFG, LAYOUTS, SHAPES, TOP_LINEARS, factors, rel_err, write
from test_memory_streaming import LiveBytes

from sora import cli, memory, model_cache, ops, runtime
from sora.checkpoints import load_into
from sora.dit import DiTConfig, WanDiT
from sora.errors import CheckpointError
from sora.handle import ModelHandle
from sora.lora import apply_lora, apply_to_state_dict, read_lora
from sora.nodes import loaders, sampling, text_encode
from sora.nodes.lora import SoraLoraLoader

pytestmark = pytest.mark.usefixtures("fresh_manager")
REL_TOL = 1e-5


def base_model(config=CFG, seed=1) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(config).eval().requires_grad_(False)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    return model


def merged(model: WanDiT, lora, strength: float) -> WanDiT:
    """The oracle: the patches merged into a copy of the weights by hand (`W + s·Δ` in float32)."""
    out = WanDiT(model.config).eval()
    matched = apply_lora(lora, model, strength).patches
    patches = {}
    for p in matched:
        patches.setdefault(p.target, []).append(p.delta)
    state = {k: v.float() for k, v in model.state_dict().items() if not k.endswith("scale_weight")}
    load_into(out, apply_to_state_dict(state, patches, strength), what="Wan DiT")
    return out


def inputs(seed=5):
    gen = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 16, 2, 4, 4, generator=gen), torch.randn(2, 5, 24, generator=gen)
    return x, torch.tensor([700.0, 250.0]), context


def full_deltas(seed=21):
    """lightx2v-style extras: diff_b on biases, diff on norms, diff_m on each block's modulation."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in SHAPES.items():
        if key.endswith(".bias") and key.removesuffix(".bias") in BLOCK_LINEARS + TOP_LINEARS:
            sd[f"diffusion_model.{key.removesuffix('.bias')}.diff_b"] = 0.05 * torch.randn(shape, generator=gen)
        elif "norm" in key and key.endswith(".weight"):
            sd[f"diffusion_model.{key.removesuffix('.weight')}.diff"] = 0.05 * torch.randn(shape, generator=gen)
        elif key.startswith("blocks.") and key.endswith("modulation"):
            sd[f"diffusion_model.{key.rsplit('.', 1)[0]}.diff_m"] = 0.05 * torch.randn(shape, generator=gen)
    return sd


@pytest.mark.parametrize("layout,alpha,modules,name", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_every_layout_applied_on_the_fly_equals_the_hand_merge(layout, alpha, modules, name):
    model = base_model()
    lora = read_lora({**write(factors(modules, seed=3, alpha=alpha), layout), **full_deltas()})
    x, t, ctx = inputs()
    with torch.no_grad():
        plain = model(x, t, ctx)
        for strength in (1.0, -0.6):
            applied = apply_lora(lora, model, strength)
            assert applied.unmatched == [] and applied.matched_keys == applied.total_keys
            ours = ModelHandle(model).patched(*applied.patches)(x, t, ctx)
            assert rel_err(ours, merged(model, lora, strength)(x, t, ctx)) <= REL_TOL, strength
        assert torch.equal(model(x, t, ctx), plain)  # the shared model is untouched


def test_strength_zero_is_the_base_bit_for_bit_and_loras_stack():
    model = base_model()
    x, t, ctx = inputs()
    one = read_lora(write(factors(BLOCK_LINEARS, seed=4, alpha=True), "original"))
    two = read_lora(write(factors(BLOCK_LINEARS[:6], seed=6, alpha=False), "kohya"))
    base = ModelHandle(model)
    with torch.no_grad():
        assert torch.equal(base.patched(*apply_lora(one, model, 0.0).patches)(x, t, ctx), base(x, t, ctx))
        stacked = base.patched(*apply_lora(one, model, 0.8).patches).patched(*apply_lora(two, model, 0.5).patches)
        state = dict(model.state_dict())
        by_target = {}
        for p in apply_lora(one, model, 0.8).patches + apply_lora(two, model, 0.5).patches:
            by_target.setdefault(p.target, []).append((p.delta, p.strength))
        for target, deltas in by_target.items():  # W + 0.8·Δ1 + 0.5·Δ2, by hand
            state[target] = state[target] + sum(d.delta(s) for d, s in deltas)
        oracle = WanDiT(CFG).eval()
        load_into(oracle, state, what="Wan DiT")
        assert rel_err(stacked(x, t, ctx), oracle(x, t, ctx)) <= REL_TOL


def test_fp8_weights_take_a_lora_without_being_dequantised_for_good():
    """fp8 storage: the handle adds the low-rank term to the per-call upcast, so the error against the exact merge
    on the fp8 weights' own values is float32 rounding (<= 1e-5); merging into the fp8 tensor instead would round
    W + Δ to fp8 again (3 mantissa bits: up to 2^-4 relative per weight), which the test shows is far larger."""
    model = base_model()
    ops.cast_weights(model, torch.float8_e4m3fn)
    lora = read_lora(write(factors(BLOCK_LINEARS + TOP_LINEARS, seed=8, alpha=True), "original"))
    x, t, ctx = inputs()
    with torch.no_grad():
        ours = ModelHandle(model).patched(*apply_lora(lora, model, 1.0).patches)(x, t, ctx)
        exact = merged(model, lora, 1.0)(x, t, ctx)
        assert rel_err(ours, exact) <= REL_TOL
        requantised = merged(model, lora, 1.0)
        ops.cast_weights(requantised, torch.float8_e4m3fn)
        assert rel_err(requantised(x, t, ctx), exact) > 10 * rel_err(ours, exact)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in model.modules() if isinstance(m, ops.Linear))


def test_a_streamed_block_carries_its_lora():
    model = base_model(DiTConfig(**{**CFG.__dict__, "num_layers": 4}))
    lora = read_lora({**write(factors([f"blocks.{i}.ffn.0" for i in range(2)], seed=9, alpha=True), "original"),
                      **full_deltas()})
    handle = ModelHandle(model).patched(*apply_lora(lora, model, 1.0).patches)
    x, t, ctx = inputs()
    with torch.no_grad():
        resident = handle(x, t, ctx)
        streamed = handle.with_memory(blocks_resident=0)(x, t, ctx)  # every block copied in per call
    assert memory.get_manager().state(model).location == "streamed"
    assert torch.equal(streamed, resident)


def test_applying_a_lora_holds_no_second_copy_of_the_model():
    """A 40-block model with a rank-32 LoRA on every Linear: the patched forward's live memory above the base
    forward's stays within the LoRA's own factors (kept on the device) and one layer's worth of LoRA activations,
    far below the 40 blocks' weights a merged copy would take."""
    config = DiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=40, text_dim=24, freq_dim=16)
    model = base_model(config)
    modules = [f"blocks.{i}.{m}" for i in range(40) for m in ("self_attn.q", "self_attn.k", "self_attn.v",
                                                              "self_attn.o", "cross_attn.q", "ffn.0", "ffn.2")]
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for m in modules:
        out_dim, in_dim = model.get_submodule(m).weight.shape
        sd[f"diffusion_model.{m}.lora_down.weight"] = torch.randn(32, in_dim, generator=gen) * 0.01
        sd[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(out_dim, 32, generator=gen) * 0.01
    handle = ModelHandle(model).patched(*apply_lora(read_lora(sd), model, 1.0).patches)
    x, t, ctx = torch.randn(1, 16, 1, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, 24)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lora_bytes = sum(v.numel() * 4 for v in sd.values())
    existing = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers(), x, t, ctx,
                                                                    *sd.values())}
    with torch.no_grad():
        with LiveBytes(existing) as plain:
            ModelHandle(model)(x, t, ctx)
        with LiveBytes(existing) as patched:
            handle(x, t, ctx)
    assert patched.peak - plain.peak <= lora_bytes + 4 * 16 * 32 * 256
    assert patched.peak - plain.peak < weights / 4


# ---------------------------------------------------------------------------------------------------------------
# The node, files, families, the distill workflow
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def host(models, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models, output_dir=tmp_path / "out")
    return models


DISTILL = "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"


def stand_in(name="wan2.1_t2v_14B_bf16.safetensors"):
    return loaders.SoraModelLoader().load(name, "default", "auto", "sdpa", loaders.AUTO_EXPERT)[0]


def test_the_node_reports_and_two_branches_each_match_their_oracle(host):
    model = stand_in()
    node = SoraLoraLoader()
    first = node.load(model, DISTILL, 1.0)
    second = node.load(model, DISTILL, -0.5)
    (strong,), (weak,) = first["result"], second["result"]
    report = first["ui"]["text"][0]
    assert report.startswith(f"{DISTILL}: 118 of 118 keys applied (original layout)")
    lora = model_cache.load(read_lora, host / "loras" / DISTILL)
    (encoder,) = loaders.SoraTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "default", "auto")
    positive, negative = text_encode.SoraTextEncode().encode(encoder, "a red ball", "wan default", "")
    (latent,) = sampling.SoraEmptyLatentVideo().generate(model, 64, 32, 9, 1)
    (sigmas,) = sampling.SoraScheduler().schedule(model, 4, 0.0, "distill", 1.0)

    def run(handle):
        return sampling.SoraSampler().sample(handle, positive, negative, latent, sigmas, 3, 1.0, "lcm", 1.0)[0][
            "samples"]
    outputs = {s: run(h) for s, h in ((1.0, strong), (-0.5, weak))}
    for strength, out in outputs.items():  # in one graph, each branch with its own LoRA
        oracle = ModelHandle(merged(model.model, lora, strength), model.name)
        torch.testing.assert_close(out, run(oracle), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs[1.0], outputs[-0.5])
    assert torch.equal(run(node.load(model, DISTILL, 0.0)["result"][0]), run(model))  # strength 0: the base


def test_keys_that_do_not_fit_are_listed_and_a_foreign_lora_is_refused(host, tmp_path, caplog):
    model = stand_in()
    i2v = {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 128),
           "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(128, 4),
           "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 128),
           "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, 4)}
    save_file(i2v, host / "loras" / "i2v_style.safetensors")
    with caplog.at_level("WARNING"):
        result = SoraLoraLoader().load(model, "", 1.0, path=str(host / "loras" / "i2v_style.safetensors"))
    text = result["ui"]["text"][0]
    assert text.startswith("i2v_style.safetensors: 2 of 4 keys applied")
    assert "k_img.lora_down.weight: the model has no blocks.0.cross_attn.k_img (an image-to-video LoRA" in text
    assert "2 keys did not apply" in caplog.text

    flux = {f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight": torch.zeros(4, 8) for i in range(3)}
    flux |= {k.replace("lora_down", "lora_up"): torch.zeros(8, 4) for k in flux}
    save_file(flux, tmp_path / "flux_style.safetensors")
    with pytest.raises(CheckpointError, match=r"^Sora Load LoRA: input 'path': flux_style.safetensors: no key of "
                                              r"this LoRA fits the model \(it looks like a Flux LoRA\)"):
        SoraLoraLoader().load(model, "", 1.0, path=str(tmp_path / "flux_style.safetensors"))


def test_the_distill_workflow_runs_in_four_model_calls(host, tmp_path, capsys, monkeypatch):
    calls = []
    real = WanDiT.forward

    def counting(self, x, timestep, context):
        calls.append(x.shape[0])
        return real(self, x, timestep, context)
    monkeypatch.setattr(WanDiT, "forward", counting)
    workflow = runtime.ASSETS.parent / "api" / "wan21_t2v_14B_distill_lora.json"
    prompt = json.loads(workflow.read_text())
    latent = next(i for i, n in prompt.items() if n["class_type"] == "SoraEmptyLatentVideo")
    sets = [f"--set={latent}.width=64", f"--set={latent}.height=32", f"--set={latent}.frames=9"]
    assert cli.main(["run", str(workflow), "--models-dir", str(host), "--output-dir", str(tmp_path / "o"), *sets]) == 0
    assert calls == [1, 1, 1, 1]  # 4 steps, guidance 1: one forward of one sample per step
