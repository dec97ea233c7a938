"""The Wan 2.1 image branch (I2V-14B, FLF2V-14B) and the VACE branch of the DiT against diffusers, on random small
configs with the same weights through our conversion; the released 14B names and shapes on the meta device."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from test_dit import randomize, rel_err

from sora.checkpoints import load_into
from sora.dit import PRESETS, DiTConfig, WanDiT, convert_diffusers, detect_config
from sora.errors import InputError

REL_TOL = 1e-5
TEXT_LEN = 512  # diffusers takes what lies before the last 512 context rows as image tokens


def build(ref, cfg: DiTConfig) -> WanDiT:
    ours = WanDiT(cfg).eval()
    load_into(ours, convert_diffusers(ref.state_dict()), what="Wan DiT")
    return ours


def image_config(flf2v: bool) -> DiTConfig:
    return DiTConfig(model_type="flf2v" if flf2v else "i2v", in_dim=36, out_dim=16, dim=32, ffn_dim=48, num_heads=2,
                     num_layers=2, text_dim=24, freq_dim=32, image_dim=40, image_positions=2 * 5 if flf2v else 0)


@pytest.mark.parametrize("flf2v", [False, True], ids=["i2v", "flf2v"])
def test_image_branch_matches_diffusers(flf2v):
    cfg = image_config(flf2v)
    ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers, eps=cfg.eps, image_dim=cfg.image_dim,
                                added_kv_proj_dim=cfg.dim, pos_embed_seq_len=cfg.image_positions or None).eval()
    randomize(ref, seed=4)
    ours = build(ref, cfg)
    assert ours.config == detect_config(convert_diffusers(ref.state_dict()), {"sora.num_heads": "2"})  # from tensors
    gen = torch.Generator().manual_seed(2)
    images = 2 if flf2v else 1
    x = torch.randn(2, 36, 2, 4, 4, generator=gen)
    t = torch.tensor([900.0, 120.0])
    text = torch.randn(2, 7, cfg.text_dim, generator=gen)
    clip = torch.randn(2, 5 * images, cfg.image_dim, generator=gen)  # 5 tokens per image (257 in the real model)
    with torch.no_grad():
        # diffusers takes FLF2V's images one per row [2B, tokens, width] and joins each sample's two itself
        per_image = clip.reshape(2 * images, 5, cfg.image_dim) if flf2v else clip
        expected = ref(x, t, F.pad(text, (0, 0, 0, TEXT_LEN - 7)), encoder_hidden_states_image=per_image,
                       return_dict=False)[0]
        out = ours(x, t, text, image=clip)
        assert rel_err(out, expected) <= REL_TOL
        assert rel_err(ours(x, t, text, image=torch.zeros_like(clip)), expected) > 1e-3  # the image matters
    with pytest.raises(InputError, match="reads CLIP image tokens"):
        ours(x, t, text)


def test_a_model_without_image_branch_refuses_image_tokens():
    model = WanDiT(PRESETS["tiny"])
    with pytest.raises(InputError, match="no image branch"):
        model(torch.zeros(1, 16, 1, 2, 2), torch.tensor([1.0]), torch.zeros(1, 2, 24), image=torch.zeros(1, 5, 8))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_vace_branch_matches_diffusers(scale):
    cfg = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=4, text_dim=24, freq_dim=32, vace_layers=(0, 2))
    ref = WanVACETransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                    attention_head_dim=cfg.head_dim, in_channels=16, out_channels=16,
                                    text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                    num_layers=cfg.num_layers, eps=cfg.eps, vace_layers=[0, 2],
                                    vace_in_channels=96).eval()
    randomize(ref, seed=6)  # the zero-initialised projections too: the branch must do something
    ours = build(ref, cfg)
    assert ours.config == detect_config(convert_diffusers(ref.state_dict()), {"sora.num_heads": "2"})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 3, 4, 4, generator=gen)
    control = torch.randn(1, 96, 3, 4, 4, generator=gen)
    t, text = torch.tensor([600.0]), torch.randn(1, 6, cfg.text_dim, generator=gen)
    with torch.no_grad():
        expected = ref(x, t, F.pad(text, (0, 0, 0, TEXT_LEN - 6)), control_hidden_states=control,
                       control_hidden_states_scale=torch.tensor([scale, scale]), return_dict=False)[0]
        out = ours(x, t, text, vace=[(control, scale)])
        assert rel_err(out, expected) <= REL_TOL
        without = ours(x, t, text)
        assert rel_err(without, expected) > 1e-3
        halves = ours(x, t, text, vace=[(control, scale / 2), (control, scale / 2)])  # stacked inputs add up
        assert rel_err(halves, out) <= REL_TOL


# The released names and shapes (Wan-AI/Wan2.1-I2V-14B-480P, FLF2V-14B-720P; ECOSYSTEM_FACTS §5.2, VACE §6).
I2V_14B = {
    "img_emb.proj.0.weight": [1280], "img_emb.proj.0.bias": [1280], "img_emb.proj.1.weight": [1280, 1280],
    "img_emb.proj.1.bias": [1280], "img_emb.proj.3.weight": [5120, 1280], "img_emb.proj.3.bias": [5120],
    "img_emb.proj.4.weight": [5120], "img_emb.proj.4.bias": [5120], "blocks.0.cross_attn.k_img.weight": [5120, 5120],
    "blocks.0.cross_attn.k_img.bias": [5120], "blocks.39.cross_attn.v_img.weight": [5120, 5120],
    "blocks.39.cross_attn.v_img.bias": [5120], "blocks.17.cross_attn.norm_k_img.weight": [5120],
    "patch_embedding.weight": [5120, 36, 1, 2, 2], "head.head.weight": [64, 5120],
}
VACE_14B = {"vace_patch_embedding.weight": [5120, 96, 1, 2, 2], "vace_blocks.0.before_proj.weight": [5120, 5120],
            "vace_blocks.7.after_proj.weight": [5120, 5120], "vace_blocks.7.ffn.0.weight": [13824, 5120],
            "vace_blocks.3.modulation": [1, 6, 5120]}


def test_14b_configs_have_the_released_names_and_shapes():
    with torch.device("meta"):
        i2v = {k: list(v.shape) for k, v in WanDiT(PRESETS["wan21_i2v_14b"]).state_dict().items()}
        flf2v = {k: list(v.shape) for k, v in WanDiT(PRESETS["wan21_flf2v_14b"]).state_dict().items()}
        vace = WanDiT(PRESETS["wan21_vace_14b"]).state_dict()
    assert all(i2v[k] == shape for k, shape in I2V_14B.items())
    assert "img_emb.emb_pos" not in i2v and flf2v["img_emb.emb_pos"] == [1, 514, 1280]
    assert len([k for k in i2v if k.startswith("img_emb.")]) == 8
    assert len([k for k in i2v if ".k_img." in k or ".v_img." in k or "norm_k_img" in k]) == 40 * 5
    assert all(list(vace[k].shape) == shape for k, shape in VACE_14B.items())
    assert "vace_blocks.1.before_proj.weight" not in vace and "vace_blocks.8.after_proj.weight" not in vace
    assert detect_config({k: torch.empty(v, device="meta") for k, v in i2v.items()}) == PRESETS["wan21_i2v_14b"]
    assert detect_config({k: torch.empty(v.shape, device="meta") for k, v in vace.items()}) == PRESETS["wan21_vace_14b"]


@pytest.mark.parametrize("fmt", ["gguf", "fp8"])
def test_the_image_branch_loads_quantised(fmt, tmp_path):
    """city96's I2V GGUFs quantise k_img / v_img and img_emb's Linears like every other Linear; fp8 storage does
    too. Either way the model reads the tokens (another image, another velocity) and stays close to the original."""
    import re

    from sora import dit, standins

    shape = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)
    cfg = DiTConfig(model_type="i2v", in_dim=36, out_dim=16, image_dim=256, **shape)
    tensors = {k: v.contiguous() for k, v in standins._gguf_dit(cfg, 1)().items()}
    if fmt == "gguf":
        def q8_0(name, t):
            image = re.search(r"(k_img|v_img)\.weight$|img_emb\.proj\.[13]\.weight$", name)
            return 8 if image else standins._q8_0(name, t)
        path = tmp_path / "wan2.1-i2v-14b-Q8_0.gguf"
        standins._write_gguf("wan", q8_0)(path, tensors)
        model = dit.load_dit(path)
        assert model.blocks[0].cross_attn.k_img.weight.dtype == torch.uint8  # still quantised in memory
    else:
        from safetensors.torch import save_file
        path = tmp_path / "wan2.1_i2v_480p_14B_bf16.safetensors"
        save_file(tensors, str(path))
        model = dit.load_dit(path, weight_dtype=torch.float8_e4m3fn)
        assert model.blocks[0].cross_attn.k_img.weight.dtype == torch.float8_e4m3fn
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "float.safetensors"))
    reference = dit.load_dit(tmp_path / "float.safetensors")
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 36, 1, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    image, other = torch.randn(2, 1, 5, 256, generator=g)
    t = torch.tensor([500.0])
    out = model(x, t, context, image=image)
    assert rel_err(out, reference(x, t, context, image=image)) < 0.05
    assert rel_err(model(x, t, context, image=other), out) > 1e-4
