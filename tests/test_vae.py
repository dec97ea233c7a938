"""The Wan VAE: parity with diffusers, the facts-sheet layout, detection, loading, causality and input checks.

Numerical parity is measured as max |ours - diffusers| / max |diffusers| <= 1e-5 in float32. On these random tiny
models two float32 implementations differ by about 3e-6, and each lies about 3e-6 from a float64 run: that is the
rounding floor of the network (different convolution kernels sum in different orders), so 1e-5 leaves a 3x margin.
Tiling is tested in test_vae_tiling.py.
"""
import json

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from sora.errors import CheckpointError, InputError, Interrupted
from sora.vae import CausalConv3d, VAEConfig, WanVAE, detect_vae_config, load_vae, to_original_layout

TOLERANCE = 1e-5


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gains near 1, small biases, unit-variance convolutions: decoded values mostly inside the [-1, 1] clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def video(b: int, frames: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent(b: int, c: int, t: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(seed))


def assert_parity(ours: WanVAE, ref: AutoencoderKLWan, batch: int = 1) -> None:
    """Encode 9 frames and decode 3 latent frames (the causal caches reach their steady state on chunk 3)."""
    s, z = ours.config.spatial_factor, ours.config.z_dim
    x = video(batch, 9, 2 * s, 3 * s)
    lat = latent(batch, z, 3, 2, 3)
    with torch.no_grad():
        mu_ref = ref.encode(x).latent_dist.mode()
        frames_ref = ref.decode(lat).sample
    mu, frames = ours.encode(x), ours.decode(lat)
    assert mu.dtype == frames.dtype == torch.float32
    assert mu.shape == mu_ref.shape == (batch, z, 3, 2, 3)
    assert frames.shape == frames_ref.shape == (batch, 3, 9, 2 * s, 3 * s)
    assert (frames_ref.abs() < 1).float().mean() > 0.5, "test weights saturate the clamp; parity would be vacuous"
    assert rel_err(mu, mu_ref) <= TOLERANCE
    assert rel_err(frames, frames_ref) <= TOLERANCE


# --------------------------------------------------------------------------------------------------------------------
# parity with diffusers' AutoencoderKLWan
# --------------------------------------------------------------------------------------------------------------------

def test_original_layout_matches_diffusers_21(tmp_path):
    """Our key names go through diffusers' own converter for the original Wan 2.1 layout (an independent map)."""
    model = randomize(WanVAE(VAEConfig.tiny()))
    torch.save(model.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    ref = AutoencoderKLWan(base_dim=8, z_dim=4).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(model.state_dict())), strict=True)
    assert_parity(load_vae(tmp_path / "Wan2.1_VAE.pth"), ref, batch=2)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_diffusers_layout_file_matches_diffusers(tmp_path, version):
    if version == "2.1":
        ref, expected = AutoencoderKLWan(base_dim=8, z_dim=4), VAEConfig.tiny()
    else:
        ref = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=8, is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16)
        expected = VAEConfig.tiny(decoder_base_dim=12, z_dim=8, patch_size=2, residual_shortcuts=True)
    randomize(ref)
    save_file(ref.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    ours = load_vae(tmp_path / "diffusion_pytorch_model.safetensors")
    assert ours.config == expected
    assert_parity(ours, ref)


# --------------------------------------------------------------------------------------------------------------------
# the full-size layouts (ARCH_FACTS §2.1, §2.4), built on the meta device
# --------------------------------------------------------------------------------------------------------------------

FACT_SHAPES_21 = {
    "encoder.conv1.weight": [96, 3, 3, 3, 3],
    "encoder.downsamples.0.residual.0.gamma": [96, 1, 1, 1],
    "encoder.downsamples.3.residual.2.weight": [192, 96, 3, 3, 3],
    "encoder.downsamples.3.shortcut.weight": [192, 96, 1, 1, 1],
    "encoder.downsamples.6.shortcut.weight": [384, 192, 1, 1, 1],
    "encoder.downsamples.2.resample.1.weight": [96, 96, 3, 3],
    "encoder.downsamples.5.resample.1.weight": [192, 192, 3, 3],
    "encoder.downsamples.8.resample.1.weight": [384, 384, 3, 3],
    "encoder.downsamples.5.time_conv.weight": [192, 192, 3, 1, 1],
    "encoder.downsamples.8.time_conv.weight": [384, 384, 3, 1, 1],
    "encoder.middle.1.norm.gamma": [384, 1, 1],
    "encoder.middle.1.to_qkv.weight": [1152, 384, 1, 1],
    "encoder.middle.1.proj.weight": [384, 384, 1, 1],
    "encoder.head.0.gamma": [384, 1, 1, 1],
    "encoder.head.2.weight": [32, 384, 3, 3, 3],
    "conv1.weight": [32, 32, 1, 1, 1],
    "conv2.weight": [16, 16, 1, 1, 1],
    "decoder.conv1.weight": [384, 16, 3, 3, 3],
    "decoder.upsamples.3.time_conv.weight": [768, 384, 3, 1, 1],
    "decoder.upsamples.7.time_conv.weight": [768, 384, 3, 1, 1],
    "decoder.upsamples.3.resample.1.weight": [192, 384, 3, 3],
    "decoder.upsamples.7.resample.1.weight": [192, 384, 3, 3],
    "decoder.upsamples.11.resample.1.weight": [96, 192, 3, 3],
    "decoder.upsamples.4.shortcut.weight": [384, 192, 1, 1, 1],
    "decoder.head.2.weight": [3, 96, 3, 3, 3],
}

FACT_SHAPES_22 = {
    "encoder.conv1.weight": [160, 12, 3, 3, 3],
    "encoder.head.2.weight": [96, 640, 3, 3, 3],
    "conv1.weight": [96, 96, 1, 1, 1],
    "conv2.weight": [48, 48, 1, 1, 1],
    "decoder.conv1.weight": [1024, 48, 3, 3, 3],
    "decoder.upsamples.0.upsamples.0.residual.2.weight": [1024, 1024, 3, 3, 3],
    "decoder.head.2.weight": [12, 256, 3, 3, 3],
}


def meta_model(config: VAEConfig) -> WanVAE:
    with torch.device("meta"):
        return WanVAE(config)


@pytest.mark.parametrize("config, tensors, params, cache_slots, shapes", [
    (VAEConfig.wan21(), 194, 126_892_531, (26, 33), FACT_SHAPES_21),
    (VAEConfig.wan22(), 196, 704_688_668, (26, 34), FACT_SHAPES_22),
])
def test_full_size_layout_matches_the_facts_sheet(config, tensors, params, cache_slots, shapes):
    model = meta_model(config)
    state = model.state_dict()
    assert len(state) == tensors
    assert sum(v.numel() for v in state.values()) == params
    for key, shape in shapes.items():
        assert list(state[key].shape) == shape, key
    slots = tuple(sum(isinstance(m, CausalConv3d) for m in part.modules()) for part in (model.encoder, model.decoder))
    assert slots == cache_slots
    assert detect_vae_config(state) == config
    assert (config.spatial_factor, config.temporal_factor) == ((8, 4) if config.patch_size == 1 else (16, 4))


@pytest.mark.parametrize("config", [
    VAEConfig.tiny(),
    VAEConfig.tiny(base_dim=12, decoder_base_dim=16, z_dim=8),  # nano-sized widths, another z_dim
    VAEConfig.tiny(dim_mult=(1, 2, 2), temporal_downsample=(True, False), num_res_blocks=1),
    VAEConfig.tiny(z_dim=6, patch_size=2, residual_shortcuts=True, decoder_base_dim=16),
])
def test_detection_reads_the_config_back_from_tensors(config):
    assert detect_vae_config(meta_model(config).state_dict()) == config


# --------------------------------------------------------------------------------------------------------------------
# loading and its errors
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_state():
    return {k: v.clone() for k, v in randomize(WanVAE(VAEConfig.tiny())).state_dict().items()}


def test_prefixed_sharded_file_loads_in_bf16(tmp_path, tiny_state):
    keys = sorted(tiny_state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({f"vae.{k}": tiny_state[k] for k in part}, tmp_path / name)
    index = {"weight_map": {f"vae.{k}": name for name, part in shards.items() for k in part}}
    (tmp_path / "vae.safetensors.index.json").write_text(json.dumps(index))
    model = load_vae(tmp_path / "vae.safetensors.index.json", dtype=torch.bfloat16)
    assert model.config == VAEConfig.tiny()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    full = load_vae(tmp_path / "vae.safetensors.index.json")
    assert full.dtype == torch.float32
    lat = latent(1, 4, 2, 2, 2)
    frames = model.decode(lat)
    assert frames.dtype == torch.float32
    assert (frames - full.decode(lat)).abs().max() < 0.1  # bf16 keeps 8 bits of mantissa


def _write(path, tensors):
    save_file({k: torch.zeros(v) if isinstance(v, tuple) else v for k, v in tensors.items()}, path)
    return path


@pytest.mark.parametrize("tensors, message", [
    ({"model.diffusion_model.patch_embedding.weight": (8, 16, 1, 2, 2), "model.diffusion_model.head.modulation":
      (1, 2, 8)}, "diffusion transformer"),
    ({"encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4), "shared.weight": (10, 4)}, "text encoder"),
    ({"decoder.mid.block_1.norm1.weight": (4,), "encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3)}, "image VAE"),
    ({"something.else": (2,)}, "none of its 1 tensors"),
])
def test_a_file_that_is_not_a_wan_vae_says_what_it_looks_like(tmp_path, tensors, message):
    with pytest.raises(CheckpointError, match=message):
        load_vae(_write(tmp_path / "x.safetensors", tensors))


def test_shape_mismatch_and_missing_tensor_name_the_key(tmp_path, tiny_state):
    bad = dict(tiny_state, **{"decoder.middle.0.residual.2.weight": torch.zeros(32, 32, 3, 3, 1)})
    with pytest.raises(CheckpointError, match=r"decoder\.middle\.0\.residual\.2\.weight.*\[32, 32, 3, 3, 3\]"):
        load_vae(_write(tmp_path / "bad.safetensors", bad))
    missing = {k: v for k, v in tiny_state.items() if k != "decoder.head.2.bias"}
    with pytest.raises(CheckpointError, match=r"decoder\.head\.2\.bias"):
        load_vae(_write(tmp_path / "missing.safetensors", missing))


def test_truncated_file_is_reported(tmp_path, tiny_state):
    data = _write(tmp_path / "vae.safetensors", tiny_state).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(tmp_path / "cut.safetensors")


def test_diffusers_names_convert_back_to_the_original_ones(tiny_state):
    diffusers_names = convert_wan_vae_to_diffusers(dict(tiny_state))
    assert to_original_layout(diffusers_names).keys() == tiny_state.keys()


# --------------------------------------------------------------------------------------------------------------------
# behaviour: causality, progress, input checks
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return randomize(WanVAE(VAEConfig.tiny()))


def test_chunks_are_causal(tiny):
    """Frame k depends only on frames <= k: a prefix decodes (encodes) to the same values, bit for bit."""
    lat = latent(1, 4, 4, 2, 2)
    assert torch.equal(tiny.decode(lat[:, :, :2]), tiny.decode(lat)[:, :, :5])
    x = video(1, 13, 16, 16)
    assert torch.equal(tiny.encode(x[:, :, :5]), tiny.encode(x)[:, :, :2])


def test_callback_reports_every_chunk_and_can_interrupt(tiny):
    calls = []
    tiny.decode(latent(1, 4, 3, 2, 2), callback=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    def stop(done, total):
        raise Interrupted("cancelled")

    with pytest.raises(Interrupted):
        tiny.encode(video(1, 5, 16, 16), callback=stop)


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 10, 16, 16), "10 frames .* use 9 or 13"),
    ((1, 3, 0, 16, 16), "at least 1 frame"),
    ((1, 3, 5, 30, 16), "height 30 .* multiple of 8.* use 24 or 32"),
    ((1, 3, 5, 16, 4), "width 4 .* use 8"),
    ((1, 4, 5, 16, 16), r"\[batch, 3, frames, height, width\]"),
    ((5, 16, 16, 3), "IMAGE layout"),
])
def test_bad_video_says_what_to_change(tiny, shape, message):
    with pytest.raises(InputError, match=message):
        tiny.encode(torch.zeros(shape))


def test_bad_latent_says_what_to_change(tiny):
    with pytest.raises(InputError, match="16 channels but this VAE decodes 4-channel"):
        tiny.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(InputError, match=r"\[batch, 4, latent_frames"):
        tiny.decode(torch.zeros(4, 2, 2, 2))
