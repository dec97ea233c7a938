"""The stand-in model files: real names, real key layouts, detected like the real files, deterministic."""
import hashlib

import pytest
import torch
from safetensors import safe_open

from sora import cli, clip_vision, dit, standins, text, vae

NAMES = {
    "diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors",
    "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors",
    "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors",
    "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors",
    "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae/wan_2.1_vae.safetensors",
    "vae/wan2.2_vae.safetensors",
    "diffusion_models/wan2.1_t2v_14B_bf16.safetensors",
    "loras/wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors",
    "loras/wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors",
    "loras/wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors",
    "diffusion_models/wan2.1-t2v-14b-Q4_K_M.gguf",
    "diffusion_models/wan2.1-t2v-14b-Q8_0.gguf",
    "text_encoders/umt5-xxl-encoder-Q8_0.gguf",
    "diffusion_models/wan2.1_i2v_480p_14B_fp16.safetensors",
    "diffusion_models/wan2.1_flf2v_720p_14B_fp16.safetensors",
    "clip_vision/clip_vision_h.safetensors",
    "diffusion_models/wan2.1_vace_1.3B_fp16.safetensors",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    standins.write_standins(root)
    return root


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_command_writes_every_file_under_its_real_name(tmp_path, capsys):
    assert cli.main(["stand-ins", str(tmp_path)]) == 0
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == NAMES
    assert set(capsys.readouterr().out.split()) == {str(tmp_path / name) for name in NAMES}


def test_files_are_the_same_bytes_on_every_run(tmp_path, root):
    standins.write_standins(tmp_path)
    for name in NAMES:
        assert digest(tmp_path / name) == digest(root / name), name


def keys_and_dtypes(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_dits_are_detected_like_the_real_files(root):
    umt5 = text.load_text_encoder(root / "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                  cache=text.EncodingCache())
    expected = {"wan2.1_t2v_1.3B_bf16.safetensors": ("t2v", 16, "wan21", False, "BF16"),
                "wan2.2_ti2v_5B_fp16.safetensors": ("ti2v", 48, "wan22", True, "F16")}
    for name, (model_type, channels, latent_format, per_token, dtype) in expected.items():
        path = root / "diffusion_models" / name
        stored = keys_and_dtypes(path)
        assert all(k.startswith("model.diffusion_model.") for k in stored)  # ComfyUI's repackaged layout
        assert set(stored.values()) == {dtype}
        config = dit.load_dit(path, compute_dtype=torch.float32).config
        assert (config.model_type, config.in_dim, config.out_dim) == (model_type, channels, channels)
        assert (config.latent_format, config.per_token_timesteps) == (latent_format, per_token)
        assert config.head_dim == 128  # the head count was inferred the way it is for real Wan files
        assert config.text_dim == umt5.dim  # the stand-in text encoder drives the stand-in DiTs


def test_umt5_is_scaled_fp8_with_an_embedded_tokenizer(root):
    path = root / "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    stored = keys_and_dtypes(path)
    quantised = [k for k, d in stored.items() if d == "F8_E4M3" and k != "scaled_fp8"]
    assert len(quantised) == 7 * standins.UMT5_STANDIN.num_layers  # q, k, v, o, wi_0, wi_1, wo per block
    assert all(stored[k.removesuffix("weight") + "scale_weight"] == "F32" for k in quantised)
    assert stored["scaled_fp8"] == "F8_E4M3" and stored["spiece_model"] == "U8"
    assert stored["shared.weight"] == "F16"
    encoder = text.load_text_encoder(path, cache=text.EncodingCache())
    q = encoder.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_weight is not None
    embeds, lengths = encoder.encode(["a red circle moving to the right", "a cat"])
    assert embeds.shape == (2, 512, 32) and torch.isfinite(embeds).all()
    assert lengths[0] > lengths[1] > 1  # real tokenization: the longer prompt has more pieces, plus EOS


@pytest.mark.parametrize("name, z_dim, spatial, dtype", [("wan_2.1_vae.safetensors", 16, 8, torch.bfloat16),
                                                          ("wan2.2_vae.safetensors", 48, 16, torch.float32)])
def test_vaes_have_the_real_latent_channels_and_compression(root, name, z_dim, spatial, dtype):
    path = root / "vae" / name
    assert vae.ANCHOR in keys_and_dtypes(path)  # unprefixed, as ComfyUI's VAE loader expects
    model = vae.load_vae(path)
    assert (model.config.z_dim, model.config.spatial_factor, model.config.temporal_factor) == (z_dim, spatial, 4)
    assert model.dtype == dtype
    video = torch.rand(1, 3, 5, 2 * spatial, 4 * spatial) * 2 - 1
    latent = model.encode(video.to(dtype))
    assert latent.shape == (1, z_dim, 2, 2, 4)
    assert model.decode(latent).shape == video.shape


def test_gguf_standins_are_in_city96s_layout_and_load(root):
    import gguf as gguf_py

    from sora.gguf import read_gguf
    for name, quantised in (("wan2.1-t2v-14b-Q4_K_M.gguf", {"Q4_K", "Q6_K"}), ("wan2.1-t2v-14b-Q8_0.gguf", {"Q8_0"})):
        tensors, metadata = read_gguf(root / "diffusion_models" / name)
        assert metadata["general.architecture"] == "wan" and "patch_embedding.weight" in tensors  # no prefix
        kinds = {t.type_name for t in tensors.values() if hasattr(t, "type_name")}
        assert kinds == quantised and tensors["blocks.0.modulation"].dtype == torch.float32
        assert dit.load_dit(root / "diffusion_models" / name).config.num_layers == 2
    tensors, metadata = read_gguf(root / "text_encoders" / "umt5-xxl-encoder-Q8_0.gguf")
    assert metadata["general.architecture"] == "t5encoder" and "enc.blk.0.attn_q.weight" in tensors
    assert 0 < len(metadata["tokenizer.ggml.tokens"]) <= standins.UMT5_STANDIN.vocab_size  # the spiece pieces
    assert gguf_py.GGMLQuantizationType.Q8_0 == tensors["enc.blk.0.attn_q.weight"].qtype


def test_the_wan21_image_models_and_clip_vision_are_detected_like_the_real_files(root):
    encoder = clip_vision.load_clip_vision(root / "clip_vision/clip_vision_h.safetensors")
    stored = keys_and_dtypes(root / "clip_vision/clip_vision_h.safetensors")
    assert clip_vision.HF_ANCHOR in stored and "visual_projection.weight" in stored  # ComfyUI's layout
    for name, model_type, positions in (("wan2.1_i2v_480p_14B_fp16.safetensors", "i2v", 0),
                                        ("wan2.1_flf2v_720p_14B_fp16.safetensors", "flf2v",
                                         2 * encoder.config.num_tokens)):
        stored = keys_and_dtypes(root / "diffusion_models" / name)
        assert "model.diffusion_model.img_emb.proj.0.weight" in stored
        assert ("model.diffusion_model.img_emb.emb_pos" in stored) == bool(positions)
        config = dit.load_dit(root / "diffusion_models" / name).config
        assert (config.model_type, config.in_dim, config.out_dim) == (model_type, 36, 16)
        assert config.image_dim == encoder.config.hidden_size and config.image_positions == positions
