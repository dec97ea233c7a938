"""The Wan DiT against diffusers' independent implementation, and the reference key table of ARCH_FACTS §1.5.

Each parity test builds a small random diffusers `WanTransformer3DModel`, converts its state dict with our
diffusers -> original rename table, loads it into `WanDiT` and compares outputs in float32. Every parameter is
randomised (norm weights and biases included), so a wrong rename, a norm swap or a wrong modulation order shows.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from sora import ops
from sora.checkpoints import load_into
from sora.dit import PRESETS, DiTConfig, WanDiT, convert_diffusers, detect_config
from sora.errors import InputError
from sora.rope import axis_frequencies, axis_pairs, rope_table

REL_TOL = 1e-5  # the bar for float32


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter a random value of a sensible scale (both naming schemes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 3 and p.shape[0] == 1:  # modulation tables [1, 6 or 2, dim]
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def diffusers_model(cfg: DiTConfig, seed: int) -> WanTransformer3DModel:
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps, rope_max_seq_len=cfg.rope_max_len)
    randomize(model, seed)
    return model.eval()


def ours_from(ref: WanTransformer3DModel, cfg: DiTConfig) -> WanDiT:
    model = WanDiT(cfg).eval()
    load_into(model, convert_diffusers(ref.state_dict()), what="Wan DiT")
    return model


def diffusers_forward(ref, x, t, context, text_len):
    """diffusers takes the context already padded to the text length (its pipeline pads with zeros)."""
    with torch.no_grad():
        return ref(x, t, F.pad(context, (0, 0, 0, text_len - context.shape[1])), return_dict=False)[0]


# (name, config, latent (C, T, H, W), timestep kind)
CASES = [
    ("wan21_t2v", DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=24, freq_dim=32),
     (16, 2, 8, 8), "sample"),
    ("wan22_ti2v_48ch_per_token", DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=48, ffn_dim=96,
                                            num_heads=2, num_layers=2, text_dim=16, freq_dim=16,
                                            latent_format="wan22", per_token_timesteps=True),
     (48, 3, 4, 6), "token"),
    ("uneven_grid_head24", DiTConfig(dim=72, ffn_dim=80, num_heads=3, num_layers=3, text_dim=20, text_len=64,
                                     freq_dim=32), (16, 5, 6, 10), "sample"),
    ("i2v_36ch_per_frame", DiTConfig(model_type="i2v", in_dim=36, out_dim=16, dim=32, ffn_dim=48, num_heads=2,
                                     num_layers=2, text_dim=24, freq_dim=32), (36, 3, 6, 4), "frame"),
]


@pytest.mark.parametrize("name,cfg,shape,kind", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(name, cfg, shape, kind):
    ref = diffusers_model(cfg, seed=1)
    ours = ours_from(ref, cfg)
    B, (C, T, H, W) = 2, shape
    tokens = T * (H // 2) * (W // 2)
    x = torch.randn(B, C, T, H, W)
    context = torch.randn(B, 7, cfg.text_dim)
    if kind == "sample":
        t = torch.tensor([999.0, 412.5])
        t_ref = t
    elif kind == "frame":  # [B, T]; diffusers gets the same values spread over each frame's tokens
        t = torch.tensor([[0.0, 700.0, 700.0], [250.0, 250.5, 999.0]])
        t_ref = t.repeat_interleave(tokens // T, dim=1)
    else:  # per token, as the TI2V-5B pipeline builds it (expand_timesteps): first frame clean
        t = torch.full((B, tokens), 875.25)
        t[:, : tokens // T] = 0.0
        t[1, -5:] = 13.0
        t_ref = t
    with torch.no_grad():
        out = ours(x, t, context)
    expected = diffusers_forward(ref, x, t_ref, context, cfg.text_len)
    assert out.dtype == torch.float32 and out.shape == (B, cfg.out_dim, T, H, W)
    assert rel_err(out, expected) <= REL_TOL


def test_list_input_pads_and_masks():
    """Latents of different sizes in one call equal each latent run alone, and diffusers on each."""
    cfg = CASES[0][1]
    ref = diffusers_model(cfg, seed=2)
    ours = ours_from(ref, cfg)
    latents = [torch.randn(16, 3, 4, 6), torch.randn(16, 1, 8, 8), torch.randn(16, 2, 2, 4)]
    t = torch.tensor([800.0, 10.0, 500.0])
    context = torch.randn(3, 5, cfg.text_dim)
    with torch.no_grad():
        outs = ours(latents, t, context)
    for i, latent in enumerate(latents):
        assert outs[i].shape == (16,) + latent.shape[1:]
        expected = diffusers_forward(ref, latent[None], t[i:i + 1], context[i:i + 1], cfg.text_len)[0]
        assert rel_err(outs[i], expected) <= REL_TOL
        with torch.no_grad():
            alone = ours(latent[None], t[i:i + 1], context[i:i + 1])[0]
        assert rel_err(outs[i], alone) <= REL_TOL


@pytest.mark.parametrize("rows", ["mixed_lengths", "full_text_len", "empty"])
def test_context_padding_matches_diffusers(rows):
    """Zero rows (our padding, or trailing zeros already in the input) weigh exactly like the reference's."""
    cfg = CASES[2][1]  # text_len 64
    ref = diffusers_model(cfg, seed=5)
    ours = ours_from(ref, cfg)
    x, t = torch.randn(2, 16, 1, 4, 4), torch.tensor([300.0, 900.0])
    if rows == "mixed_lengths":  # sample 1: 3 real rows, an interior zero row, then zeros up to the batch length
        context = torch.randn(2, 9, cfg.text_dim)
        context[1, 4:] = 0
        context[1, 1] = 0
    elif rows == "full_text_len":
        context = torch.randn(2, cfg.text_len, cfg.text_dim)
    else:
        context = torch.zeros(2, 0, cfg.text_dim)
    with torch.no_grad():
        out = ours(x, t, context)
    assert rel_err(out, diffusers_forward(ref, x, t, context, cfg.text_len)) <= REL_TOL


def test_per_frame_equals_per_token_and_per_sample():
    cfg = CASES[0][1]
    model = ours_from(diffusers_model(cfg, seed=3), cfg)
    x, context = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 3, cfg.text_dim)
    with torch.no_grad():
        per_sample = model(x, torch.tensor([600.0]), context)
        per_frame = model(x, torch.tensor([[600.0, 600.0]]), context)
        per_token = model(x, torch.full((1, 8), 600.0), context)
        mixed = model(x, torch.tensor([[0.0, 600.0]]), context)
    assert torch.equal(per_sample, per_frame) and torch.equal(per_sample, per_token)
    assert not torch.allclose(mixed, per_sample)


def test_bf16_compute_keeps_float32_policy():
    cfg = CASES[2][1]
    model = ours_from(diffusers_model(cfg, seed=4), cfg)
    x, t, context = torch.randn(1, 16, 2, 4, 6), torch.tensor([500.0]), torch.randn(1, 4, cfg.text_dim)
    with torch.no_grad():
        full = model(x, t, context)
        model.set_compute(dtype=torch.bfloat16)
        half = model(x, t, context)
    assert model.blocks[0].ffn[0].compute_dtype == torch.bfloat16
    for name in ("time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"):
        assert model.get_submodule(name).compute_dtype == torch.float32
    assert half.dtype == torch.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operand); a few layers stay well inside 2^-4.
    assert 0 < rel_err(half, full) < 2**-4


def test_trains_end_to_end():
    """Every parameter gets a finite gradient (the nano model is trained with this class)."""
    model = WanDiT(PRESETS["tiny"]).train()
    randomize(model, seed=6)
    x, context = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 5, 24)
    t = torch.tensor([[0.0, 500.0], [250.0, 999.0]])  # per frame: clean first frame on sample 0
    model(x, t, context).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


def test_input_errors():
    model = WanDiT(PRESETS["tiny"]).eval()
    cfg = model.config
    x, t, context = torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, cfg.text_dim)
    with pytest.raises(InputError, match="16 latent channels"):
        model(torch.randn(1, 15, 1, 4, 4), t, context)
    with pytest.raises(InputError, match="divisible by the patch"):
        model(torch.randn(1, 16, 1, 5, 4), t, context)
    with pytest.raises(InputError, match="at most 8"):
        model(x, t, torch.randn(1, 9, cfg.text_dim))
    with pytest.raises(InputError, match=r"context must be \[1, L, 24\]"):
        model(x, t, torch.randn(1, 3, 7))
    with pytest.raises(InputError, match="values per sample"):
        model(x, torch.zeros(1, 3), context)
    with pytest.raises(InputError, match="RoPE table"):
        WanDiT(DiTConfig(**{**PRESETS["tiny"].__dict__, "rope_max_len": 2}))(x.expand(-1, -1, 3, -1, -1), t, context)
    with pytest.raises(InputError, match="learned positions"):
        DiTConfig(model_type="flf2v")


# ARCH_FACTS §1.5, Wan2.1 T2V-1.3B, written out by hand from the table.
NON_BLOCK_1_3B = {
    "patch_embedding.weight": (1536, 16, 1, 2, 2), "patch_embedding.bias": (1536,),
    "text_embedding.0.weight": (1536, 4096), "text_embedding.0.bias": (1536,),
    "text_embedding.2.weight": (1536, 1536), "text_embedding.2.bias": (1536,),
    "time_embedding.0.weight": (1536, 256), "time_embedding.0.bias": (1536,),
    "time_embedding.2.weight": (1536, 1536), "time_embedding.2.bias": (1536,),
    "time_projection.1.weight": (9216, 1536), "time_projection.1.bias": (9216,),
    "head.modulation": (1, 2, 1536), "head.head.weight": (64, 1536), "head.head.bias": (64,),
}
BLOCK_1_3B = {
    "modulation": (1, 6, 1536),
    **{f"{attn}.{p}.weight": (1536, 1536) for attn in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"{attn}.{p}.bias": (1536,) for attn in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"{attn}.{n}.weight": (1536,) for attn in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")},
    "norm3.weight": (1536,), "norm3.bias": (1536,),
    "ffn.0.weight": (8960, 1536), "ffn.0.bias": (8960,), "ffn.2.weight": (1536, 8960), "ffn.2.bias": (1536,),
}


def test_wan21_1_3b_state_dict_matches_reference_table():
    with torch.device("meta"):
        model = WanDiT(PRESETS["wan21_t2v_1_3b"])
    expected = dict(NON_BLOCK_1_3B)
    for n in range(30):
        expected.update({f"blocks.{n}.{k}": v for k, v in BLOCK_1_3B.items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 825 and got == expected
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800  # ARCH_FACTS §1.1
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 + 30 * 10 and all(isinstance(m, ops.Linear) for m in linears)  # fp8-capable layers


@pytest.mark.parametrize("name", ["wan21_t2v_1_3b", "wan21_t2v_14b", "wan22_ti2v_5b", "wan22_i2v_a14b"])
def test_detect_config_recovers_presets(name):
    with torch.device("meta"):
        state_dict = WanDiT(PRESETS[name]).state_dict()
    assert detect_config(state_dict) == PRESETS[name]


def test_rope_split_and_angles_by_hand():
    assert axis_pairs(128) == (22, 21, 21)  # ARCH_FACTS §1.3
    table = rope_table((3, 4, 5), 128)
    token = (2 * 4 + 3) * 5 + 4  # frame 2, row 3, column 4
    angle = table[token].angle().double()
    # pair 1 (frame axis, denominator 44), pair 22 + 2 (row axis, 42), pair 43 + 20 (column axis, 42)
    assert angle[1].item() == pytest.approx(2 * 10000 ** (-2 / 44), abs=1e-6)
    assert angle[24].item() == pytest.approx(3 * 10000 ** (-4 / 42), abs=1e-6)
    assert angle[63].item() == pytest.approx(4 * 10000 ** (-40 / 42), abs=1e-6)
    assert axis_frequencies(21)[20].item() == pytest.approx(10000 ** (-40 / 42), rel=1e-12)
