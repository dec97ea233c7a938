"""LoRA key layouts -> patches on our parameter names, checked by hand and against diffusers + PEFT.

Each layout test writes one random LoRA over a tiny `WanDiT` in a real key layout (ECOSYSTEM_FACTS §1.1), reads it
with `sora.lora.read_lora` and compares every patch's delta with the hand-derived s·(alpha/r)·up@down (or s·diff).
The parity tests load the same LoRA into diffusers' `WanTransformer3DModel` through its own converter and PEFT, and
compare the forward output with our model loaded with `apply_to_state_dict(base, patches, s)`.
"""
import json

import pytest
import torch
from diffusers.loaders import WanLoraLoaderMixin
from safetensors.torch import save_file
from test_dit import diffusers_forward, diffusers_model, rel_err

from sora.checkpoints import load_into
from sora.dit import DiTConfig, WanDiT, convert_diffusers
from sora.errors import CheckpointError, InputError
from sora.handle import ModelHandle
from sora.lora import (
    FullDelta,
    LoHa,
    LoKr,
    LowRank,
    apply_lora,
    apply_to_state_dict,
    guess_family,
    kohya_name,
    match,
    read_lora,
)

REL_TOL = 1e-5
CFG = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=24, freq_dim=32)
with torch.device("meta"):
    SHAPES = {k: v.shape for k, v in WanDiT(CFG).state_dict().items()}

BLOCK_LINEARS = [f"blocks.{i}.{m}" for i in range(2) for m in
                 ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]
TOP_LINEARS = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
               "head.head"]

# Original -> diffusers module names, written out from ECOSYSTEM_FACTS §1.2 (independent of sora.dit's table).
DIFFUSERS_NAME = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
}


def diffusers_module(module: str) -> str:
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"blocks.{i}.{DIFFUSERS_NAME[rest]}"
    return DIFFUSERS_NAME[module]


def factors(modules, seed, alpha: bool):
    """{module: (down [r, in], up [out, r], alpha or None)} with ranks 2..4 and alphas unlike the rank.

    The deltas are about a third of the weights' size: a strong change that keeps the tiny model in the regime
    where float32 forward passes agree to 1e-5 (full-size random deltas on the time embedding reach 1.4e-5,
    with diffusers' LoRA fused into its weights as well as unfused).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, module in enumerate(modules):
        o, i = SHAPES[module + ".weight"]
        r = 2 + n % 3
        down = torch.randn(r, i, generator=gen) / i**0.5
        up = 0.3 * torch.randn(o, r, generator=gen) / r**0.5
        out[module] = (down, up, float(r) * (0.5 + 0.75 * (n % 4)) if alpha else None)
    return out


def write(fs, layout: str) -> dict[str, torch.Tensor]:
    """The factors as a LoRA file in one of the layouts of ECOSYSTEM_FACTS §1.1."""
    sd = {}
    for module, (down, up, alpha) in fs.items():
        if layout in ("original", "original_bare", "original_ab", "kohya", "wan-fun"):
            base = {"original": "diffusion_model.", "original_ab": "diffusion_model."}.get(layout, "") + module
            if layout in ("kohya", "wan-fun"):
                base = ("lora_unet__" if layout == "wan-fun" else "lora_unet_") + module.replace(".", "_")
            names = ("lora_A", "lora_B") if layout == "original_ab" else ("lora_down", "lora_up")
        else:
            prefix = {"peft": "transformer.", "peft_base": "base_model.model.", "diffusers_dm": "diffusion_model."}
            base, names = prefix[layout] + diffusers_module(module), ("lora_A", "lora_B")
        sd[f"{base}.{names[0]}.weight"] = down.clone()
        sd[f"{base}.{names[1]}.weight"] = up.clone()
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    return sd


def expected_delta(down, up, alpha, s):
    return s * (1.0 if alpha is None else alpha / down.shape[0]) * (up @ down)


# (layout, with alpha, modules, the layout read_lora should report)
LAYOUTS = [
    ("original", True, BLOCK_LINEARS + TOP_LINEARS, "original"),
    ("original_bare", True, BLOCK_LINEARS[:5], "original"),
    ("original_ab", False, BLOCK_LINEARS + TOP_LINEARS, "original"),
    ("kohya", True, BLOCK_LINEARS + TOP_LINEARS, "kohya"),
    ("wan-fun", True, BLOCK_LINEARS, "wan-fun"),
    ("peft", False, BLOCK_LINEARS + TOP_LINEARS, "diffusers"),
    ("peft_base", False, BLOCK_LINEARS + TOP_LINEARS, "diffusers"),
    ("diffusers_dm", False, BLOCK_LINEARS, "diffusers"),
]


@pytest.mark.parametrize("layout,alpha,modules,name", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_layout_maps_to_our_parameters(layout, alpha, modules, name):
    fs = factors(modules, seed=3, alpha=alpha)
    lora = read_lora(write(fs, layout))
    assert lora.layout == name and lora.unused == []
    assert set(lora.patches) == {m + ".weight" for m in modules}
    for module, (down, up, a) in fs.items():
        (patch,) = lora.patches[module + ".weight"]
        assert isinstance(patch, LowRank) and patch.alpha == a and patch.rank == down.shape[0]
        assert torch.allclose(patch.delta(-0.7), expected_delta(down, up, a, -0.7), atol=1e-6, rtol=1e-5)
    matched, unmatched = match(lora, SHAPES)
    assert unmatched == [] and set(matched) == set(lora.patches)


def test_full_deltas_attach_to_weights_biases_norms_and_modulation():
    gen = torch.Generator().manual_seed(4)

    def rnd(shape):
        return torch.randn(shape, generator=gen)

    # file key -> our parameter; original names (ComfyUI prefix), one kohya key
    targets = {
        "diffusion_model.blocks.0.self_attn.q.diff_b": "blocks.0.self_attn.q.bias",
        "diffusion_model.blocks.1.ffn.2.diff": "blocks.1.ffn.2.weight",
        "diffusion_model.blocks.1.ffn.2.diff_b": "blocks.1.ffn.2.bias",
        "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm3.weight",
        "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm3.bias",
        "diffusion_model.blocks.1.self_attn.norm_q.diff": "blocks.1.self_attn.norm_q.weight",
        "diffusion_model.blocks.0.cross_attn.norm_k.diff": "blocks.0.cross_attn.norm_k.weight",
        "diffusion_model.blocks.0.diff_m": "blocks.0.modulation",
        "diffusion_model.blocks.1.diff_m": "blocks.1.modulation",
        "diffusion_model.head.modulation.diff": "head.modulation",
        "diffusion_model.patch_embedding.diff": "patch_embedding.weight",
        "diffusion_model.text_embedding.0.diff_b": "text_embedding.0.bias",
        "diffusion_model.time_projection.1.diff_b": "time_projection.1.bias",
        "lora_unet_blocks_1_norm3.diff_b": "blocks.1.norm3.bias",
    }
    sd = {key: rnd(SHAPES[target]) for key, target in targets.items()}
    lowrank = factors(["blocks.0.self_attn.q"], seed=5, alpha=True)
    sd.update(write(lowrank, "original"))  # a LoRA pair next to the bias delta of the same Linear
    lora = read_lora(sd)
    assert lora.unused == [] and lora.layout == "kohya+original"
    for key, target in targets.items():
        patches = [p for p in lora.patches[target] if isinstance(p, FullDelta)]
        assert len(patches) == 1 and patches[0].keys == (key,)
        assert torch.equal(patches[0].delta(0.25), 0.25 * sd[key])
    assert [type(p) for p in lora.patches["blocks.0.self_attn.q.weight"]] == [LowRank]

    matched, unmatched = match(lora, SHAPES)
    assert unmatched == []
    base = {k: torch.randn(v) for k, v in SHAPES.items()}
    for s in (1.0, -0.6):
        merged = apply_to_state_dict(base, matched, s)
        down, up, alpha = lowrank["blocks.0.self_attn.q"]
        hand = dict(base)
        for key, target in targets.items():
            hand[target] = hand[target] + s * sd[key]
        hand["blocks.0.self_attn.q.weight"] = base["blocks.0.self_attn.q.weight"] + expected_delta(down, up, alpha, s)
        for k in base:
            assert torch.allclose(merged[k], hand[k], atol=1e-6), k
        assert merged["blocks.0.self_attn.k.weight"] is base["blocks.0.self_attn.k.weight"]  # untouched: shared


def test_wan_fun_and_kohya_merge_by_hand():
    """No diffusers converter takes Wan-Fun keys (the double underscore), so the oracle is W + s·(alpha/r)·up@down."""
    fs = factors(BLOCK_LINEARS + TOP_LINEARS[:2], seed=6, alpha=True)
    base = {k: torch.randn(v) for k, v in SHAPES.items()}
    for layout in ("wan-fun", "kohya"):
        lora = read_lora(write(fs, layout))
        matched, unmatched = match(lora, SHAPES)
        assert unmatched == []
        merged = apply_to_state_dict(base, matched, 0.8)
        for module, (down, up, alpha) in fs.items():
            hand = base[module + ".weight"] + 0.8 * (alpha / down.shape[0]) * (up @ down)
            assert torch.allclose(merged[module + ".weight"], hand, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Parity with diffusers + PEFT
# ------------------------------------------------------------------------------------------------------------------

def with_bias_deltas(sd, modules, seed):
    """Add `diff_b` bias deltas (PEFT lora_B.bias in diffusers) to the given Linears of an original-layout file."""
    gen = torch.Generator().manual_seed(seed)
    for m in modules:
        sd[f"diffusion_model.{m}.diff_b"] = 0.1 * torch.randn(SHAPES[m + ".bias"], generator=gen)
    return sd


# (name, file, load_lora_adapter prefix). The files stay inside what diffusers 0.42's converters take: in the
# original layout `.alpha` only on block modules (an alpha on text/time embedding, time_projection or head is left
# over and raises ValueError); kohya files only with q/k/v/o of both attentions and ffn.0/2 in every block, each with
# an alpha (anything else: KeyError / IndexError). diffusers drops `diff` on norms and ignores other `diff` and
# `diff_m` keys, so those are checked by hand above. `base_model.model.` keys load only with that prefix given.
PARITY = [
    ("original_down_up_alpha_blocks_plus_top_without_alpha",
     lambda: {**write(factors(BLOCK_LINEARS, 7, alpha=True), "original"),
              **write(factors(TOP_LINEARS, 8, alpha=False), "original")}, "transformer"),
    ("original_A_B_with_diff_b", lambda: with_bias_deltas(
        write(factors(BLOCK_LINEARS + TOP_LINEARS, 9, alpha=False), "original_ab"),
        BLOCK_LINEARS + ["time_projection.1", "head.head", "text_embedding.0"], seed=10), "transformer"),
    ("original_A_B_with_head_diff", lambda: {  # diffusers: an identity lora_B over the diff (lightx2v Wan2.2 head)
        **write(factors(BLOCK_LINEARS, 15, alpha=False), "original_ab"),
        "diffusion_model.head.head.diff": 0.05 * torch.randn(64, 32, generator=torch.Generator().manual_seed(16)),
        "diffusion_model.head.head.diff_b": 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(17))},
     "transformer"),
    ("kohya_alpha_all_block_linears", lambda: write(factors(BLOCK_LINEARS, 11, alpha=True), "kohya"), "transformer"),
    ("peft_transformer", lambda: write(factors(BLOCK_LINEARS + TOP_LINEARS, 12, alpha=False), "peft"),
     "transformer"),
    ("peft_base_model_model", lambda: write(factors(BLOCK_LINEARS, 13, alpha=False), "peft_base"),
     "base_model.model"),
]


@pytest.mark.parametrize("name,make,prefix", PARITY, ids=[c[0] for c in PARITY])
def test_matches_diffusers_peft(name, make, prefix):
    sd = make()
    ref = diffusers_model(CFG, seed=1)
    base = {k: v.clone() for k, v in convert_diffusers(ref.state_dict()).items()}
    # diffusers' converter scales some tensors of its input in place (cross-attn / FFN alphas): give it copies.
    converted = WanLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    ref.load_lora_adapter(converted, prefix=prefix, adapter_name="x")

    lora = read_lora(sd)
    matched, unmatched = match(lora, SHAPES)
    assert unmatched == []
    gen = torch.Generator().manual_seed(14)
    x, t, context = torch.randn(2, 16, 2, 4, 4, generator=gen), torch.tensor([700.0, 250.0]), torch.randn(2, 5, 24)
    plain = WanDiT(CFG).eval()
    load_into(plain, base, what="Wan DiT")
    with torch.no_grad():
        without = plain(x, t, context)
    for s in (1.0, 0.7, -0.5):
        ref.set_adapters(["x"], weights=[s])
        expected = diffusers_forward(ref, x, t, context, CFG.text_len)
        ours = WanDiT(CFG).eval()
        load_into(ours, apply_to_state_dict(base, matched, s), what="Wan DiT")
        with torch.no_grad():
            out = ours(x, t, context)
            on_the_fly = ModelHandle(plain).patched(*apply_lora(lora, plain, s).patches)(x, t, context)
        assert rel_err(out, expected) <= REL_TOL, s
        assert rel_err(on_the_fly, expected) <= REL_TOL, s  # the handle's patches, the base weights untouched
        assert rel_err(without, expected) > 1e-2  # the LoRA did something, in diffusers too
    with torch.no_grad():
        assert torch.equal(plain(x, t, context), without)


# ------------------------------------------------------------------------------------------------------------------
# Other patch kinds, matching, files, families
# ------------------------------------------------------------------------------------------------------------------

def test_loha_lokr_locon_and_conv_by_hand():
    gen = torch.Generator().manual_seed(15)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    w1a, w1b, w2a, w2b = rnd(32, 3), rnd(3, 32), rnd(32, 3), rnd(3, 32)
    k1, k2 = rnd(8, 2), rnd(8, 16)
    down, mid, up = rnd(3, 64), rnd(3, 3), rnd(32, 3)
    cdown, cup = rnd(2, 16, 1, 2, 2), rnd(32, 2, 1, 1, 1)  # conv LoRA on the patch embedding
    sd = {
        "lora_unet_blocks_0_self_attn_q.hada_w1_a": w1a, "lora_unet_blocks_0_self_attn_q.hada_w1_b": w1b,
        "lora_unet_blocks_0_self_attn_q.hada_w2_a": w2a, "lora_unet_blocks_0_self_attn_q.hada_w2_b": w2b,
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(6.0),
        "lora_unet_blocks_1_ffn_0.lokr_w1": k1, "lora_unet_blocks_1_ffn_0.lokr_w2": k2,
        "lora_unet_blocks_1_ffn_0.alpha": torch.tensor(5.0),  # both factors full: no alpha scaling
        "lora_unet_blocks_0_ffn_2.lora_down.weight": down, "lora_unet_blocks_0_ffn_2.lora_mid.weight": mid,
        "lora_unet_blocks_0_ffn_2.lora_up.weight": up, "lora_unet_blocks_0_ffn_2.alpha": torch.tensor(1.5),
        "lora_unet_patch_embedding.lora_down.weight": cdown, "lora_unet_patch_embedding.lora_up.weight": cup,
    }
    lora = read_lora(sd)
    assert lora.unused == [] and match(lora, SHAPES)[1] == []
    (loha,) = lora.patches["blocks.0.self_attn.q.weight"]
    assert isinstance(loha, LoHa) and loha.scale == 2.0
    assert torch.allclose(loha.delta(0.5), 0.5 * 2.0 * torch.einsum("ik,kj->ij", w1a, w1b)
                          * torch.einsum("ik,kj->ij", w2a, w2b), rtol=1e-5, atol=1e-5)
    (lokr,) = lora.patches["blocks.1.ffn.0.weight"]
    assert isinstance(lokr, LoKr) and lokr.scale == 1.0 and lokr.shape == (64, 32)
    d = lokr.delta(1.0)
    for (i, j, k, m) in [(0, 0, 0, 0), (7, 1, 7, 15), (2, 0, 5, 9)]:
        assert torch.allclose(d[i * 8 + k, j * 16 + m], k1[i, j] * k2[k, m])  # kron by its definition
    w2a, w2b = rnd(8, 3), rnd(3, 16)
    low = LoKr(w1=k1, w2_a=w2a, w2_b=w2b, alpha=6.0)  # a low-rank factor: alpha / its rank
    assert low.scale == 2.0 and torch.allclose(low.delta(0.5), torch.kron(k1, w2a @ w2b), atol=1e-5)
    (locon,) = lora.patches["blocks.0.ffn.2.weight"]
    assert torch.allclose(locon.delta(1.0), 0.5 * up @ mid @ down, atol=1e-5)
    (conv,) = lora.patches["patch_embedding.weight"]
    hand = torch.einsum("or,rcthw->octhw", cup.flatten(1), cdown)
    base = {k: torch.randn(v) for k, v in SHAPES.items()}
    merged = apply_to_state_dict(base, {"patch_embedding.weight": [conv]}, 0.3)
    assert torch.allclose(merged["patch_embedding.weight"], base["patch_embedding.weight"] + 0.3 * hand, atol=1e-6)


def test_i2v_lora_on_t2v_model_reports_each_key():
    fs = factors(BLOCK_LINEARS[:3], seed=16, alpha=True)
    gen = torch.Generator().manual_seed(17)
    sd = write(fs, "original")
    sd.update({
        "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.randn(4, 32, generator=gen),
        "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.randn(32, 4, generator=gen),
        "diffusion_model.blocks.0.cross_attn.k_img.alpha": torch.tensor(4.0),
        "diffusion_model.blocks.0.cross_attn.v_img.diff_b": torch.randn(32, generator=gen),
        "diffusion_model.blocks.0.cross_attn.norm_k_img.diff": torch.randn(32, generator=gen),
        "diffusion_model.img_emb.proj.1.lora_down.weight": torch.randn(4, 1280, generator=gen),
        "diffusion_model.img_emb.proj.1.lora_up.weight": torch.randn(1280, 4, generator=gen),
        "diffusion_model.blocks.2.self_attn.q.lora_down.weight": torch.randn(4, 32, generator=gen),  # block 2 of 2
        "diffusion_model.blocks.2.self_attn.q.lora_up.weight": torch.randn(32, 4, generator=gen),
        "diffusion_model.blocks.1.self_attn.norm_q.diff_b": torch.randn(32, generator=gen),  # RMSNorm: no bias
        "diffusion_model.blocks.1.self_attn.k.lora_down.weight": torch.randn(4, 64, generator=gen),  # a 64-wide model
        "diffusion_model.blocks.1.self_attn.k.lora_up.weight": torch.randn(64, 4, generator=gen),
        "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.randn(32, 1, generator=gen),
        "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(1.0),  # alpha without its pair
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8, generator=gen),
    })
    lora = read_lora(sd)
    matched, unmatched = match(lora, SHAPES)
    assert set(matched) == {m + ".weight" for m in fs}
    reasons = dict(line.split(": ", 1) for line in unmatched)
    assert set(reasons) == set(sd) - set(write(fs, "original"))  # each key once, with its reason
    i2v = "(an image-to-video LoRA on a text-to-video model?)"
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        assert reasons[f"diffusion_model.blocks.0.cross_attn.k_img.{part}"] == \
            f"the model has no blocks.0.cross_attn.k_img {i2v}"
    assert reasons["diffusion_model.blocks.0.cross_attn.v_img.diff_b"] == \
        f"the model has no blocks.0.cross_attn.v_img {i2v}"
    assert reasons["diffusion_model.img_emb.proj.1.lora_up.weight"] == f"the model has no img_emb.proj.1 {i2v}"
    assert "the model has no blocks.2 (it has 2" in reasons["diffusion_model.blocks.2.self_attn.q.lora_down.weight"]
    assert reasons["diffusion_model.blocks.1.self_attn.norm_q.diff_b"] == \
        "the model's blocks.1.self_attn.norm_q has no bias"
    assert "its delta has shape [64, 64] but blocks.1.self_attn.k.weight is [32, 32]" in \
        reasons["diffusion_model.blocks.1.self_attn.k.lora_up.weight"]
    assert "DoRA" in reasons["diffusion_model.blocks.0.self_attn.q.dora_scale"]
    assert "alpha without" in reasons["diffusion_model.blocks.0.ffn.0.alpha"]
    assert "matches no module" in reasons["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert set(lora.unused) == {"diffusion_model.blocks.0.self_attn.q.dora_scale",
                                "diffusion_model.blocks.0.ffn.0.alpha",
                                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"}

    # Mapped onto a T2V model's own names, the image-branch keys are not understood at all.
    t2v = read_lora(sd, param_names=SHAPES)
    assert "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight" in t2v.unused


def test_kohya_names_of_any_module():
    assert kohya_name("blocks.0.self_attn.q.weight") == "lora_unet_blocks_0_self_attn_q"
    assert kohya_name("blocks.0.cross_attn.k_img.weight") == "lora_unet_blocks_0_cross_attn_k_img"
    assert kohya_name("blocks.3.modulation") == "lora_unet_blocks_3_modulation"
    gen = torch.Generator().manual_seed(18)
    modules = ["blocks.7.cross_attn.k_img", "blocks.0.ffn.0", "text_embedding.0", "time_projection.1", "head.head",
               "img_emb.proj.3", "blocks.39.cross_attn.norm_k"]
    sd = {}
    for m in modules:
        sd[f"{kohya_name(m + '.weight')}.lora_down.weight"] = torch.randn(2, 5, generator=gen)
        sd[f"{kohya_name(m + '.weight')}.lora_up.weight"] = torch.randn(5, 2, generator=gen)
    sd["lora_unet_blocks_3_modulation.diff"] = torch.randn(1, 6, 32, generator=gen)
    lora = read_lora(sd)
    assert lora.layout == "kohya" and lora.unused == []
    assert set(lora.patches) == {m + ".weight" for m in modules} | {"blocks.3.modulation"}


def test_read_from_safetensors_with_peft_metadata(tmp_path):
    """diffusers' `lora_adapter_metadata` carries the PEFT alpha (with alpha_pattern) of files without `.alpha`."""
    fs = factors(BLOCK_LINEARS[:2], seed=19, alpha=False)
    path = tmp_path / "peft.safetensors"
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"blocks.0.attn1.to_k": 3}}
    save_file(write(fs, "peft"), str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    lora = read_lora(path)
    assert lora.patches["blocks.0.self_attn.q.weight"][0].alpha == 8.0
    assert lora.patches["blocks.0.self_attn.k.weight"][0].alpha == 3.0
    with pytest.raises(CheckpointError, match="no such file"):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(InputError):
        read_lora(42)


def test_apply_keeps_dtype_and_checks_targets():
    w = torch.randn(32, 32).to(torch.bfloat16)
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    out = apply_to_state_dict({"q.weight": w}, {"q.weight": LowRank(down, up, alpha=1.0)}, 2.0)
    assert out["q.weight"].dtype == torch.bfloat16
    assert torch.equal(out["q.weight"], (w.float() + 2.0 * 0.5 * (up @ down)).to(torch.bfloat16))
    with pytest.raises(InputError, match="filter the patches"):
        apply_to_state_dict({}, {"q.weight": [FullDelta(torch.zeros(3))]})
    assert LowRank(down[..., None, None], up[..., None, None]).down.shape == (2, 32)  # 1x1-conv factors squeezed
    with pytest.raises(InputError, match="does not fit"):
        LowRank(down, torch.randn(32, 3))


def test_guess_family():
    sdxl = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    sd15 = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    flux = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_single_blocks_37_linear1.alpha"]
    flux_diffusers = ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
                      "transformer.transformer_blocks.18.attn.add_q_proj.lora_B.weight"]
    hunyuan = ["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight",
               "diffusion_model.txt_in.individual_token_refiner.blocks.0.mlp.fc1.lora_A.weight"]
    ltx = ["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
           "transformer.transformer_blocks.0.attn2.to_k.lora_A.weight"]
    wan = list(write(factors(BLOCK_LINEARS[:2], 20, alpha=True), "kohya"))
    assert guess_family(sdxl) == "SDXL"
    assert guess_family(sd15) == "SD 1.5 / SDXL"
    assert guess_family(flux) == "Flux" and guess_family(flux_diffusers) == "Flux"
    assert guess_family(hunyuan) == "HunyuanVideo"
    assert guess_family(["lora_unet_double_blocks_19_img_mod_lin.lora_down.weight"]) == "HunyuanVideo"  # 20 blocks
    assert guess_family(ltx) == "LTX-Video"
    assert guess_family(["joint_blocks.0.x_block.attn.qkv.lora_down.weight"]) == "SD3"
    assert guess_family(wan) == "Wan" and guess_family(["diffusion_model.blocks.4.diff_m"]) == "Wan"
    assert guess_family(["something.else"]) is None
    assert read_lora({k: torch.zeros(2, 2) for k in sdxl}).layout == "unknown"
