"""GGUF models through the public loaders: Wan DiTs in city96's layout and umT5 encoders in llama.cpp's T5 naming
stay quantised, run like their dequantised twins, take LoRAs on the fly, stream by their quantised size, and bad
files say what is wrong without leaving anything in the model cache."""
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sora import memory, model_cache, ops, standins, text
from sora.dit import DiTConfig, WanDiT, load_dit
from sora.errors import CheckpointError
from sora.gguf import GGML_TYPES, dequantize, row_bytes
from sora.handle import ModelHandle
from sora.lora import apply_lora, read_lora
from sora.streaming import module_bytes

pytestmark = pytest.mark.usefixtures("fresh_manager")
CONFIG = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
# block Linear -> type: a mix of what gguf-py quantises and K-quants (random valid blocks)
TYPES = {"self_attn.q": "Q8_0", "self_attn.k": "Q4_0", "self_attn.v": "Q6_K", "self_attn.o": "Q4_K",
         "cross_attn.q": "Q5_0", "cross_attn.k": "Q4_1", "cross_attn.v": "Q5_1", "cross_attn.o": "Q5_K",
         "ffn.0": "Q3_K", "ffn.2": "Q2_K"}


def write_wan_gguf(path, state_dict, types=TYPES, arch="wan", prefix=""):
    """A Wan DiT state dict as a GGUF in city96's layout; returns the dequantised state dict (the oracle's
    weights). F32 for small tensors and the 5-D patch embedding, F16 for the other unquantised ones."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    dequantised = {}
    for number, (key, value) in enumerate(state_dict.items()):
        array = value.float().numpy()
        kind = next((t for m, t in types.items() if key.startswith("blocks.") and key.endswith(f".{m}.weight")), None)
        if kind is None:
            small = array.ndim == 1 or array.size <= 1024 or "modulation" in key or array.ndim == 5
            array = array if small else array.astype(np.float16)
            writer.add_tensor(prefix + key, array)
            dequantised[key] = torch.from_numpy(array.astype(np.float32))
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        if kind.endswith("_K"):
            blocks = standins.random_k_blocks(int(qtype), array.shape[0], row_bytes(int(qtype), array.shape[1]),
                                              number).numpy()
        else:
            blocks = gguf.quants.quantize(array, qtype)
        writer.add_tensor(prefix + key, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        dequantised[key] = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantised


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(3)
    model = WanDiT(CONFIG)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    dequantised = write_wan_gguf(folder / "wan.gguf", model.state_dict())
    save_file({k: v.contiguous() for k, v in dequantised.items()}, str(folder / "wan_dequantised.safetensors"))
    return folder


def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, 2, 4, 4, generator=gen), torch.tensor([800.0, 300.0]), torch.randn(2, 5, 32,
                                                                                                   generator=gen)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_a_city96_gguf_runs_like_its_dequantised_safetensors_twin(dit_files):
    quantised = load_dit(dit_files / "wan.gguf", compute_dtype=torch.float32)
    twin = load_dit(dit_files / "wan_dequantised.safetensors", compute_dtype=torch.float32)
    assert quantised.config == twin.config  # shape detected from the tensors, as for safetensors
    for module, kind in TYPES.items():
        layer = quantised.get_submodule(f"blocks.0.{module}")
        assert layer.gguf_type == gguf.GGMLQuantizationType[kind] and layer.weight.dtype == torch.uint8
    assert quantised.patch_embedding.weight.shape == (256, 16, 1, 2, 2)  # the 5-D tensor restored
    with torch.no_grad():
        assert rel(quantised(*inputs()), twin(*inputs())) <= 1e-5
    for module, kind in TYPES.items():  # in memory: exactly the file's blocks, one row per output feature
        layer = quantised.get_submodule(f"blocks.1.{module}")
        qtype = int(gguf.GGMLQuantizationType[kind])
        assert layer.weight.numel() == layer.out_features * row_bytes(qtype, layer.in_features)
        assert layer.weight.numel() < layer.out_features * layer.in_features * GGML_TYPES[qtype].type_size / \
            GGML_TYPES[qtype].block_size + 1


def test_a_lora_applies_to_gguf_weights_on_the_fly(dit_files):
    quantised = load_dit(dit_files / "wan.gguf", compute_dtype=torch.float32)
    twin = load_dit(dit_files / "wan_dequantised.safetensors", compute_dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for m in LINEARS:
        out_dim, in_dim = twin.get_submodule(f"blocks.1.{m}").weight.shape
        sd[f"diffusion_model.blocks.1.{m}.lora_down.weight"] = torch.randn(4, in_dim, generator=gen) * 0.05
        sd[f"diffusion_model.blocks.1.{m}.lora_up.weight"] = torch.randn(out_dim, 4, generator=gen) * 0.05
    lora = read_lora(sd)
    applied = apply_lora(lora, quantised, 0.9)
    assert applied.matched_keys == applied.total_keys == 20  # GGUF layers report their real shapes
    with torch.no_grad():
        ours = ModelHandle(quantised).patched(*applied.patches)(*inputs())
        expected = ModelHandle(twin).patched(*apply_lora(lora, twin, 0.9).patches)(*inputs())
    assert rel(ours, expected) <= 1e-5 and rel(ours, quantised(*inputs())) > 1e-3


def test_quantised_bytes_decide_the_streaming_plan(dit_files):
    quantised = load_dit(dit_files / "wan.gguf", compute_dtype=torch.float32)
    twin = load_dit(dit_files / "wan_dequantised.safetensors", compute_dtype=torch.float32)
    manager = memory.get_manager()
    budget = module_bytes(twin) - module_bytes(twin.blocks[0]) // 2  # the float twin does not fit entirely
    activation = twin.activation_bytes(inputs(), {})
    plans = {}
    with torch.no_grad():
        for name, model in (("gguf", quantised), ("twin", twin)):
            ModelHandle(model).with_memory(budget_bytes=budget + activation)(*inputs())
            plans[name] = manager.state(model)
    assert plans["twin"].location == "streamed" and plans["gguf"].location == "resident"
    assert module_bytes(quantised) < 0.45 * module_bytes(twin)


def test_a_umt5_gguf_encodes_like_its_safetensors_twin(tmp_path):
    standins.write_standins(tmp_path)
    encoder = text.load_text_encoder(tmp_path / "text_encoders" / "umt5-xxl-encoder-Q8_0.gguf",
                                     cache=text.EncodingCache())
    state_dict, _ = text.read_umt5_file(tmp_path / "text_encoders" / "umt5-xxl-encoder-Q8_0.gguf")
    dequantised = {k: (v.dequantize() if hasattr(v, "dequantize") else v).contiguous() for k, v in state_dict.items()}
    proto = standins.spiece_model()
    save_file({**dequantised, "spiece_model": torch.frombuffer(bytearray(proto), dtype=torch.uint8)},
              str(tmp_path / "twin.safetensors"))
    twin = text.load_text_encoder(tmp_path / "twin.safetensors", cache=text.EncodingCache())
    prompts = ["a red circle moving to the right", "the camera pans slowly across a quiet street"]
    assert [encoder.tokenizer(p) for p in prompts] == [twin.tokenizer(p) for p in prompts]  # from the metadata
    assert any(getattr(m, "gguf_type", None) == 8 for m in encoder.model.modules())
    ours, lengths = encoder.encode(prompts)
    theirs, twin_lengths = twin.encode(prompts)
    assert torch.equal(lengths, twin_lengths) and rel(ours, theirs) <= 1e-5


def test_bad_gguf_files_name_the_file_and_leave_nothing_in_the_cache(dit_files, tmp_path):
    cache = model_cache.ModelCache()
    good = (dit_files / "wan.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "magic.gguf").write_bytes(b"NOPE" + good[4:])
    cases = {"truncated.gguf": r"truncated\.gguf.*(truncated|past the end)", "magic.gguf": r"magic\.gguf"}
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    cases["llama.gguf"] = r"llama\.gguf: this GGUF holds a 'llama' model"
    wrong = dict(WanDiT(CONFIG).state_dict())
    wrong["blocks.1.ffn.0.weight"] = torch.zeros(512, 512)  # quantised, but the wrong shape for this model
    write_wan_gguf(tmp_path / "shape.gguf", wrong)
    cases["shape.gguf"] = r"shape\.gguf.*'blocks\.1\.ffn\.0\.weight'"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            cache.load(load_dit, tmp_path / name, compute_dtype=torch.float32)
    assert len(cache) == 0
    assert isinstance(ops.parameter_shapes(WanDiT(CONFIG)), dict)


def test_dequantising_per_layer_runs_on_the_compute_device():
    """The blocks stay on the device the layer is on; dequantisation reads them there (here the CPU)."""
    blocks = gguf.quants.quantize(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32),
                                  gguf.GGMLQuantizationType.Q8_0)
    layer = ops.Linear(64, 8)
    ops.quantize(layer, 8)
    layer.weight = torch.from_numpy(blocks)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).copy())
    assert torch.equal(layer.compute_weight(torch.float32), expected)
    assert torch.equal(dequantize(layer.weight, 8, (8, 64)), expected)
