"""Loading Wan DiT files: every key layout and container, fp8 storage, metadata, and the errors users will meet.

The random checkpoint comes from diffusers' `WanTransformer3DModel`, so the diffusers-layout file is written by an
independent implementation and the original layout is derived from it by our rename table.
"""
import json
import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from sora import attention as attention_module
from sora.dit import PRESETS, WanDiT, convert_diffusers, load_dit
from sora.errors import CheckpointError, InputError

# Width 128 = one head of 128 channels, so the head count of a file without metadata is the Wan rule dim / 128.
DIM, FFN, LAYERS, TEXT_DIM, FREQ = 128, 64, 2, 32, 32


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 3 and p.shape[0] == 1:  # modulation tables
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def diffusers_state_dict():
    model = WanTransformer3DModel(num_attention_heads=1, attention_head_dim=DIM, in_channels=16, out_channels=16,
                                  text_dim=TEXT_DIM, freq_dim=FREQ, ffn_dim=FFN, num_layers=LAYERS)
    randomize(model, seed=7)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def original(diffusers_state_dict):
    return convert_diffusers(diffusers_state_dict)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(1, 16, 2, 4, 6, generator=gen), torch.tensor([700.0]),
            torch.randn(1, 6, TEXT_DIM, generator=gen))


def run(path, inputs, **kwargs):
    model = load_dit(path, compute_dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(*inputs)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def quantized_linears(state_dict):
    """The Linear weights that fp8 "scaled" files quantise: the blocks' attention and FFN matrices."""
    return [k for k in state_dict if k.startswith("blocks.") and k.endswith(".weight")
            and state_dict[k].ndim == 2]


def test_every_layout_gives_identical_outputs(tmp_path, diffusers_state_dict, original, inputs):
    save_file(original, tmp_path / "original.safetensors")
    for prefix in ("model.diffusion_model.", "diffusion_model.", "model."):
        save_file({prefix + k: v for k, v in original.items()}, tmp_path / f"{prefix.rstrip('.')}.safetensors")
    save_file(diffusers_state_dict, tmp_path / "diffusers.safetensors")
    torch.save(original, tmp_path / "original.pth")
    shards = tmp_path / "sharded"
    shards.mkdir()
    keys = sorted(original)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: original[k] for k in part}, shards / name)
        weight_map.update(dict.fromkeys(part, name))
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    model = load_dit(tmp_path / "original.safetensors", compute_dtype=torch.float32)
    with torch.no_grad():
        reference = model(*inputs)
    variants = ["model.diffusion_model.safetensors", "diffusion_model.safetensors", "model.safetensors",
                "diffusers.safetensors", "original.pth", "sharded/diffusion_pytorch_model.safetensors.index.json",
                "sharded"]
    for name in variants:
        other = load_dit(tmp_path / name, compute_dtype=torch.float32)
        assert other.config == model.config and same_weights(other, model), name
        with torch.no_grad():
            out = other(*inputs)
        # Same weights bit for bit; the outputs may differ in the last bits only because a matmul's summation
        # order depends on the memory alignment of the mapped tensors (safetensors data follows its header).
        assert (out - reference).abs().max() <= 1e-6 * reference.abs().max(), name
    assert not model.training and model.config.num_heads == 1 and model.config.latent_format == "wan21"
    model = load_dit(tmp_path / "original.safetensors")
    assert model.blocks[0].ffn[0].compute_dtype == torch.bfloat16  # the default compute dtype


def test_scaled_fp8_stays_fp8_within_the_fp8_rounding_bound(tmp_path, original, inputs):
    """ComfyUI "scaled fp8": weight = fp8(W / s) with s = max|W| / 448, and a float32 `scale_weight` s per layer.

    Tolerance derivation. float8_e4m3fn has 3 mantissa bits, so rounding to nearest changes a normal value by at
    most half a unit in the last place: relative error <= 2^-4. Below the smallest normal, 2^-6, the spacing is
    2^-9, so the error is at most 2^-10 in absolute terms. With s chosen so that |W / s| <= 448 nothing
    saturates, and each weight obeys |W' - W| <= 2^-4 |W| + 2^-10 s. For one Linear y = W x that gives the bound
    |y' - y| <= 2^-4 (|W| |x|) + 2^-10 s sum|x|, which every quantised layer of the loaded model must meet (plus
    float32 slack). The whole model is then checked to be exactly the model with the dequantised weights W'.
    """
    scaled = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    dequantized = dict(original)
    for key, value in original.items():
        scaled["model.diffusion_model." + key] = value
    for key in quantized_linears(original):
        w = original[key]
        s = w.abs().max() / 448
        w8 = (w / s).to(torch.float8_e4m3fn)
        scaled["model.diffusion_model." + key] = w8
        scaled["model.diffusion_model." + key.removesuffix("weight") + "scale_weight"] = s.reshape(())
        dequantized[key] = w8.float() * s
    save_file(scaled, tmp_path / "scaled.safetensors")
    save_file(dequantized, tmp_path / "dequantized.safetensors")

    model = load_dit(tmp_path / "scaled.safetensors", compute_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for key in quantized_linears(original):
        layer = model.get_submodule(key.removesuffix(".weight"))
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale_weight is not None
        w, s = original[key], layer.scale_weight
        x = torch.randn(5, w.shape[1], generator=gen)
        with torch.no_grad():
            error = (layer(x) - torch.nn.functional.linear(x, w, layer.bias)).abs()
        bound = 2**-4 * (x.abs() @ w.abs().T) + 2**-10 * s * x.abs().sum(1, keepdim=True)
        assert (error <= bound * (1 + 1e-5) + 1e-6).all(), key

    with torch.no_grad():
        out = model(*inputs)
    assert ((out - run(tmp_path / "dequantized.safetensors", inputs)).abs().max()
            <= 1e-5 * out.abs().max())
    save_file(original, tmp_path / "full.safetensors")
    full = run(tmp_path / "full.safetensors", inputs)
    # End to end, to first order: each block has 4 quantised matmuls in series on its residual path (v, o, ffn.0,
    # ffn.2), each off by at most 2^-4 relative, so the output is off by at most (1 + 2^-4)^(4·layers) - 1 if all
    # errors pushed the same way (about 0.62 for 2 layers). A lost or doubled scale breaks this by far.
    assert 0 < (out - full).abs().max() < ((1 + 2**-4) ** (4 * LAYERS) - 1) * full.abs().max()


def test_plain_fp8_e5m2_and_weight_dtype(tmp_path, original, inputs):
    e5m2 = dict(original)
    for key in quantized_linears(original):
        e5m2[key] = original[key].to(torch.float8_e5m2)
    save_file(e5m2, tmp_path / "e5m2.safetensors")
    model = load_dit(tmp_path / "e5m2.safetensors", compute_dtype=torch.float32)
    assert model.blocks[1].self_attn.o.weight.dtype == torch.float8_e5m2
    upcast = {k: v.float() for k, v in e5m2.items()}
    save_file(upcast, tmp_path / "upcast.safetensors")
    with torch.no_grad():
        out = model(*inputs)
    assert (out - run(tmp_path / "upcast.safetensors", inputs)).abs().max() <= 1e-5 * out.abs().max()

    save_file(original, tmp_path / "full.safetensors")
    bf16 = load_dit(tmp_path / "full.safetensors", weight_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert bf16.blocks[0].ffn[2].weight.dtype == torch.bfloat16
    assert bf16.head.modulation.dtype == torch.float32  # only Linear weights are cast


def test_nano_metadata(tmp_path):
    model = WanDiT(PRESETS["tiny"])
    metadata = {"sora.family": "nano", "sora.text_len": "8", "sora.num_heads": "2"}
    save_file(model.state_dict(), tmp_path / "nano.safetensors", metadata=metadata)
    config = load_dit(tmp_path / "nano.safetensors").config
    assert (config.latent_format, config.per_token_timesteps, config.text_len, config.num_heads) == \
        ("nano", True, 8, 2)
    assert (config.text_dim, config.dim, config.num_layers) == (24, 32, 2)


def test_not_a_dit(tmp_path):
    vae = {"encoder.conv1.weight": torch.zeros(1), "decoder.conv1.weight": torch.zeros(1)}
    save_file(vae, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="video VAE"):
        load_dit(tmp_path / "vae.safetensors")
    t5 = {"shared.weight": torch.zeros(2, 2), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}
    save_file(t5, tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match="T5 text encoder"):
        load_dit(tmp_path / "t5.safetensors")
    save_file({"foo": torch.zeros(1)}, tmp_path / "foo.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan DiT"):
        load_dit(tmp_path / "foo.safetensors")


def test_truncated_and_pickled_code(tmp_path, original):
    save_file(original, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(tmp_path / "cut.safetensors")
    torch.save({"weights": original["head.modulation"], "code": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="holds code or objects") as refused:
        load_dit(tmp_path / "evil.pth")
    assert "weights_only=False" not in str(refused.value) and "weights_only` set to `False" not in str(refused.value)
    assert not Exploit.ran


class Exploit:
    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True


def test_shape_mismatch_names_the_key(tmp_path, original):
    broken = dict(original)
    broken["blocks.1.cross_attn.o.weight"] = torch.zeros(DIM, DIM - 1)
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.cross_attn\.o\.weight.*\[128, 127\]"):
        load_dit(tmp_path / "broken.safetensors")
    del broken["blocks.1.cross_attn.o.weight"]
    save_file(broken, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.cross_attn\.o\.weight"):
        load_dit(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("extra,family", [
    ("audio_injector.weight", "speech-to-video"),
    ("casual_audio_encoder.weight", "speech-to-video"),
])
def test_unsupported_families(tmp_path, original, extra, family):
    save_file({**original, extra: torch.zeros(4)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=f"{family}.*not supported yet"):
        load_dit(tmp_path / "other.safetensors")


def test_unknown_shapes(tmp_path, original):
    odd = dict(original, **{"patch_embedding.weight": torch.zeros(DIM, 20, 1, 2, 2)})
    save_file(odd, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="20 input and 16 output"):
        load_dit(tmp_path / "odd.safetensors")
    save_file(WanDiT(PRESETS["tiny"]).state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError, match="sora.num_heads"):
        load_dit(tmp_path / "narrow.safetensors")


def test_missing_attention_backend(tmp_path, original, monkeypatch):
    save_file(original, tmp_path / "full.safetensors")
    monkeypatch.setattr(attention_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install flash-attn.*Available here: \['sdpa', 'matmul'\]"):
        load_dit(tmp_path / "full.safetensors", attention="flash_attn")
    with pytest.raises(InputError, match="unknown attention backend 'flash'"):
        load_dit(tmp_path / "full.safetensors", attention="flash")
    assert attention_module.available_backends() == ["sdpa", "matmul"]
