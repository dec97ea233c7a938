"""CLIP vision encoder: parity with transformers, the open_clip and Wan layouts, config detection, ComfyUI's
preprocessing, and the errors for files of other models."""
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig as HFConfig
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

from sora import clip_vision as cv
from sora.errors import CheckpointError, InputError

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "patch_size": 14, "image_size": 56, "layer_norm_eps": 1e-5}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _hf_model(activation: str = "gelu", projection: bool = True):
    """A transformers CLIP vision model with every parameter random (norms included), float32, eval."""
    config = HFConfig(**TINY, hidden_act=activation, projection_dim=32, attn_implementation="eager")
    model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    return model


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ours(state_dict, activation="gelu"):
    return cv.build_clip_vision(state_dict, num_heads=4, activation=activation)


# --- layout fixtures: the reverse renaming, derived by hand from the open_clip and Wan module definitions -------

def _to_open_clip(sd: dict, layers: int) -> dict:
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        # the text tower of an open_clip file, which the loader ignores
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8),
        "token_embedding.weight": torch.randn(10, 8), "ln_final.weight": torch.ones(8), "logit_scale": torch.ones(()),
    }
    for n in range(layers):
        hf, oc = f"vision_model.encoder.layers.{n}.", f"visual.transformer.resblocks.{n}."
        for p in ("weight", "bias"):
            out[oc + f"attn.in_proj_{p}"] = torch.cat([sd[hf + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[oc + f"{a}.{p}"] = sd[hf + f"{b}.{p}"]
    return out


def _to_wan(sd: dict, layers: int) -> dict:
    width = sd["vision_model.embeddings.class_embedding"].shape[0]
    out = {
        "visual.patch_embedding.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.cls_embedding": sd["vision_model.embeddings.class_embedding"].view(1, 1, width),
        "visual.pos_embedding": sd["vision_model.embeddings.position_embedding.weight"][None],
        "visual.pre_norm.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.pre_norm.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.post_norm.weight": sd["vision_model.post_layernorm.weight"],
        "visual.post_norm.bias": sd["vision_model.post_layernorm.bias"],
        "visual.head": sd["visual_projection.weight"].t().contiguous(),
        # XLM-RoBERTa text tower and the logit scale of the Wan .pth, which the loader ignores
        "textual.token_embedding.weight": torch.randn(10, 8), "textual.head.0.weight": torch.randn(8, 8),
        "log_scale": torch.ones(()),
    }
    for n in range(layers):
        hf, wan = f"vision_model.encoder.layers.{n}.", f"visual.transformer.{n}."
        for p in ("weight", "bias"):
            out[wan + f"attn.to_qkv.{p}"] = torch.cat([sd[hf + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in (("norm1", "layer_norm1"), ("attn.proj", "self_attn.out_proj"), ("norm2", "layer_norm2"),
                         ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                out[wan + f"{a}.{p}"] = sd[hf + f"{b}.{p}"]
    return out


# --- parity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_matches_transformers_hidden_states_last_state_and_image_embeds(activation):
    """penultimate = hidden_states[-2], last_hidden_state = transformers' (no post_layernorm, as ComfyUI),
    pooler_output and image_embeds = transformers', all within 1e-5 relative in float32."""
    hf = _hf_model(activation)
    ours = _ours(_hf_state_dict(hf), activation)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True)
        ref_pooled = hf.vision_model(pixel_values=pixels).pooler_output
    assert len(ref.hidden_states) == 5  # embeddings (after pre_layrnorm) + 4 layers
    out = ours.encode(pixels)
    assert out.penultimate_hidden_states.shape == (2, 17, 64) and out.penultimate_hidden_states.dtype == torch.float32
    assert _rel_err(out.penultimate_hidden_states, ref.hidden_states[-2]) <= 1e-5
    assert _rel_err(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert _rel_err(out.pooler_output, ref_pooled) <= 1e-5
    assert _rel_err(out.image_embeds, ref.image_embeds) <= 1e-5
    # forward(layer=i) is hidden_states[i + 1]; the default is the penultimate layer
    with torch.no_grad():
        assert _rel_err(ours(pixels), ref.hidden_states[-2]) <= 1e-5
        assert _rel_err(ours(pixels, layer=0), ref.hidden_states[1]) <= 1e-5
        assert _rel_err(ours(pixels, layer=-1), ref.hidden_states[-1]) <= 1e-5


def test_without_projection_matches_clip_vision_model_and_has_no_image_embeds():
    """A file without visual_projection (transformers CLIPVisionModel; from transformers 5 its names lack
    `vision_model.`) loads; image_embeds is None."""
    hf = _hf_model(projection=False)
    ours = _ours(_hf_state_dict(hf))
    assert ours.visual_projection is None and ours.config.projection_dim is None
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True)
    out = ours.encode(pixels)
    assert out.image_embeds is None
    assert _rel_err(out.penultimate_hidden_states, ref.hidden_states[-2]) <= 1e-5
    assert _rel_err(out.pooler_output, ref.pooler_output) <= 1e-5


def test_penultimate_only_stops_before_the_last_layer():
    """full=False runs num_layers - 1 layers (never the last one) and gives the same penultimate states."""
    ours = _ours(_hf_state_dict(_hf_model()))
    calls = []
    ours.vision_model.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    pixels = torch.randn(1, 3, 56, 56)
    cheap = ours.encode(pixels, full=False)
    assert not calls and cheap.last_hidden_state is None and cheap.image_embeds is None
    with torch.no_grad():
        ours(pixels)  # forward's default (-2) does not run the last layer either
    assert not calls
    assert torch.equal(cheap.penultimate_hidden_states, ours.encode(pixels).penultimate_hidden_states)
    assert len(calls) == 1


def test_open_clip_and_wan_layouts_give_identical_outputs(tmp_path):
    """The same weights stored as HF (prefixed), open_clip and Wan .pth load to bit-identical outputs."""
    sd = _hf_state_dict(_hf_model())
    hf_path = tmp_path / "clip_vision.safetensors"
    save_file({"clip_vision." + k: v.contiguous() for k, v in sd.items()}, hf_path)
    wan_path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(_to_wan(sd, 4), wan_path)
    models = [cv.load_clip_vision(hf_path, num_heads=4),
              cv.build_clip_vision({"model." + k: v for k, v in _to_open_clip(sd, 4).items()}, num_heads=4),
              cv.load_clip_vision(wan_path, num_heads=4)]
    pixels = torch.randn(2, 3, 56, 56)
    outs = [m.encode(pixels) for m in models]
    for out in outs[1:]:
        for key in ("penultimate_hidden_states", "last_hidden_state", "image_embeds"):
            assert torch.equal(out[key], outs[0][key]), key


def test_half_precision_file_keeps_its_dtype_and_computes_in_float32(tmp_path):
    """An fp16 file stays fp16 in memory (dtype=None) and computes in float32; dtype= converts the weights."""
    sd = _hf_state_dict(_hf_model())
    path = tmp_path / "clip_vision_fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in sd.items()}, path)
    model = cv.load_clip_vision(path, num_heads=4)
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.float16
    ref = _ours({k: v.half().float() for k, v in sd.items()})
    pixels = torch.randn(1, 3, 56, 56)
    assert _rel_err(model.encode(pixels).penultimate_hidden_states, ref.encode(pixels).penultimate_hidden_states) < 1e-5
    bf16 = cv.load_clip_vision(path, num_heads=4, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.encode(pixels).penultimate_hidden_states.dtype == torch.float32


# --- config detection --------------------------------------------------------------------------------------------

def test_config_detected_from_tensors():
    sd = _hf_state_dict(_hf_model())
    cfg = cv.CLIPVisionConfig.from_state_dict(sd, num_heads=4)
    assert cfg == cv.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, patch_size=14,
                                      image_size=56, projection_dim=32)
    assert cfg.num_tokens == 17


def test_vit_h_config_has_the_released_names_and_shapes():
    """The meta-device ViT-H/14 has clip_vision_h's tensor names and shapes (= transformers' for that config),
    and detection from those tensors gives back the ViT-H config (16 heads, gelu)."""
    with torch.device("meta"):
        ours = cv.CLIPVisionEncoder(cv.CLIP_VISION_H)
        hf = CLIPVisionModelWithProjection(HFConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                    num_attention_heads=16, patch_size=14, image_size=224,
                                                    projection_dim=1024, hidden_act="gelu"))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1280)
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert shapes["vision_model.embeddings.class_embedding"] == (1280,)
    assert shapes["vision_model.encoder.layers.31.mlp.fc1.weight"] == (5120, 1280)
    assert shapes["vision_model.encoder.layers.30.layer_norm1.weight"] == (1280,)  # ComfyUI's ViT-H marker
    assert shapes["visual_projection.weight"] == (1024, 1280)
    assert "vision_model.pre_layrnorm.weight" in shapes
    assert "vision_model.encoder.layers.32.mlp.fc1.weight" not in shapes
    assert len(ours.vision_model.encoder.layers) == 32
    assert cv.CLIPVisionConfig.from_state_dict(ours.state_dict()) == cv.CLIP_VISION_H


def test_tiny_preset_round_trips():
    with torch.device("meta"):
        model = cv.CLIPVisionEncoder(cv.CLIP_VISION_TINY)
    cfg = cv.CLIP_VISION_TINY
    assert cv.CLIPVisionConfig.from_state_dict(model.state_dict(), num_heads=cfg.num_heads) == cfg


# --- preprocessing -----------------------------------------------------------------------------------------------

def _normalised(value: float, channel: int) -> float:
    return (round(255 * value) / 255 - cv.CLIP_MEAN[channel]) / cv.CLIP_STD[channel]


@pytest.mark.parametrize("crop", ["center", "none"])
def test_preprocess_constant_image_quantises_and_normalises(crop):
    """A 2x-sized constant image comes out 224x224 with round(255·x)/255 normalised by CLIP's mean and std."""
    colour = (0.25, 0.5012, 0.8)  # 255·x = 63.75, 127.806, 204 -> 64, 128, 204
    images = torch.tensor(colour).expand(2, 448, 448, 3).clone()
    out = cv.preprocess(images, crop)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    by_hand = ((64 / 255 - 0.48145466) / 0.26862954, (128 / 255 - 0.4578275) / 0.26130258,
               (204 / 255 - 0.40821073) / 0.27577711)
    for c in range(3):
        assert torch.allclose(out[:, c], torch.tensor(by_hand[c]), atol=1e-6)


def test_preprocess_center_crop_keeps_the_middle_of_a_wide_image():
    """448x672: shortest side to 224 (-> 224x336), then columns 56..280, i.e. the middle 448 source columns; bright
    bands in the outer 100 columns are cut away. crop="none" squeezes the whole width in and keeps them."""
    images = torch.full((1, 448, 672, 3), 0.2)
    images[:, :, :100] = 1.0
    images[:, :, 572:] = 1.0
    centre = cv.preprocess(images, "center")
    assert centre.shape == (1, 3, 224, 224)
    for c in range(3):
        assert torch.allclose(centre[0, c], torch.tensor(_normalised(0.2, c)), atol=1e-6)
    squeezed = cv.preprocess(images, "none")
    assert squeezed.shape == (1, 3, 224, 224)
    assert torch.allclose(squeezed[0, 0, :, 0], torch.tensor(_normalised(1.0, 0)), atol=1e-6)
    assert torch.allclose(squeezed[0, 0, :, 112], torch.tensor(_normalised(0.2, 0)), atol=1e-6)


def test_preprocess_clamps_after_the_resize_and_skips_resizing_at_224():
    """Bicubic upscaling of a hard edge overshoots 0..1; the 8-bit clamp comes after the resize, so the output
    stays within the normalised 0 and 1. A 224x224 input is not resized: only quantised and normalised."""
    images = torch.zeros(1, 112, 112, 3)
    images[:, :, 56:] = 1.0
    raw = torch.nn.functional.interpolate(images.movedim(-1, 1), size=(224, 224), mode="bicubic", antialias=True)
    assert raw.max() > 1.0 and raw.min() < 0.0  # the overshoot exists
    out = cv.preprocess(images, "none")
    for c in range(3):
        assert out[0, c].max().item() == pytest.approx(_normalised(1.0, c), abs=1e-6)
        assert out[0, c].min().item() == pytest.approx(_normalised(0.0, c), abs=1e-6)
    exact = torch.rand(1, 224, 224, 4)  # with an alpha channel, which is dropped
    mean, std = torch.tensor(cv.CLIP_MEAN).view(3, 1, 1), torch.tensor(cv.CLIP_STD).view(3, 1, 1)
    expected = ((exact[..., :3].movedim(-1, 1) * 255).round() / 255 - mean) / std
    assert torch.allclose(cv.preprocess(exact, "center"), expected, atol=1e-6)


def test_encode_image_is_preprocess_then_encode_and_reads_like_comfyui_output():
    model = cv.build_clip_vision({k: torch.randn(v.shape) * 0.1 for k, v in _meta_tiny().items()}, num_heads=2)
    images = torch.rand(2, 40, 60, 3)
    out = model.encode_image(images)  # crop=True is "center"
    ref = model.encode(cv.preprocess(images, "center", size=28))
    assert torch.equal(out["penultimate_hidden_states"], ref.penultimate_hidden_states)
    assert out.penultimate_hidden_states.shape == (2, 5, 32)
    assert out["image_embeds"].shape == (2, 16) and out.mm_projected is None and "last_hidden_state" in out
    none = model.encode_image(images, crop="none")
    assert torch.equal(none.last_hidden_state, model.encode(cv.preprocess(images, "none", size=28)).last_hidden_state)
    assert torch.equal(model.encode_image(images, crop=False).image_embeds, none.image_embeds)
    out["penultimate_hidden_states"] = torch.zeros(1)  # ComfyUI's nodes assign into it (FLF2V concatenation)
    assert out.penultimate_hidden_states.shape == (1,)
    with pytest.raises(InputError):
        model.encode_image(images, crop="left")
    with pytest.raises(InputError):
        model.encode(torch.randn(1, 3, 56, 56))  # not the model's 28 px


def _meta_tiny() -> dict:
    with torch.device("meta"):
        return cv.CLIPVisionEncoder(cv.CLIP_VISION_TINY).state_dict()


# --- files of other models ---------------------------------------------------------------------------------------

def test_a_wan_dit_is_refused_and_named(tmp_path):
    from sora.dit import DiTConfig, WanDiT

    with torch.device("meta"):
        dit = WanDiT(DiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=1, text_dim=32))
    sd = {"model.diffusion_model." + k: torch.zeros(1) for k in dit.state_dict()}
    path = tmp_path / "wan2.1_i2v_480p_14B_fp16.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="Wan diffusion model") as e:
        cv.load_clip_vision(path)
    assert str(path) in str(e.value) and "clip_vision_h" in str(e.value)


@pytest.mark.parametrize("original", [False, True])
def test_a_umt5_text_encoder_is_refused_and_named(original):
    from sora.text_umt5 import ORIGINAL_TO_HF, UMT5Config, UMT5Encoder

    with torch.device("meta"):
        config = UMT5Config(vocab_size=128, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=2)
        sd = UMT5Encoder(config).state_dict()
    if original:  # the Wan .pth names
        back = {v.format(n=0): k.format(n=0) for k, v in ORIGINAL_TO_HF.items()}
        sd = {back[k]: v for k, v in sd.items() if k in back}
    with pytest.raises(CheckpointError, match="T5 / umT5 text encoder"):
        cv.build_clip_vision(sd)


def test_other_vision_towers_and_unknown_files_are_refused():
    siglip = {k: v for k, v in _meta_tiny().items() if "class_embedding" not in k}
    with pytest.raises(CheckpointError, match="SigLIP"):
        cv.build_clip_vision(siglip)
    with pytest.raises(CheckpointError, match="CLIP text encoder"):
        cv.build_clip_vision({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 2)})
    with pytest.raises(CheckpointError, match="no CLIP vision names|none of its"):
        cv.build_clip_vision({"foo.weight": torch.zeros(2)})
    broken = dict(_to_wan(_hf_state_dict(_hf_model()), 4), **{"visual.transformer.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'visual.transformer.0.attn.extra.weight'"):
        cv.build_clip_vision(broken, num_heads=4)
