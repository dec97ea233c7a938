"""sora.gguf against gguf-py: bit-exact dequantisation of every supported type, reading files, broken files."""
import re
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from sora import gguf as sg
from sora.errors import CheckpointError, InputError

QUANTISABLE = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # gguf-py can make these blocks
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # only dequantisable in gguf-py: random valid blocks
FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets


def random_floats(rng, shape):
    """Normal values with row scales from 1e-3 to 1e3, and one all-zero row (the d = 0 path)."""
    x = rng.standard_normal(shape).astype(np.float32) * np.logspace(-3, 3, shape[0], dtype=np.float32)[:, None]
    x[0] = 0
    return x


def random_k_blocks(rng, qtype: str, n: int) -> np.ndarray:
    """n random blocks [n, type_size] whose fp16 scales are finite: random sign, magnitude 2^-14 .. 2^4, or 0."""
    blocks = rng.integers(0, 256, size=(n, sg.GGML_TYPES[sg.TYPE_IDS[qtype]].type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = rng.choice([-1, 1], n) * 2.0 ** rng.uniform(-14, 4, n)
        scale[::97] = 0
        blocks[:, offset:offset + 2] = scale.astype(np.float16).reshape(n, 1).view(np.uint8)
    return blocks


def oracle_blocks(rng, qtype: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw bytes [rows, row bytes] uint8, gguf-py's float32 dequantisation [rows, cols]) for a random tensor."""
    if qtype in K_QUANTS:
        raw = random_k_blocks(rng, qtype, rows * cols // 256).reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(random_floats(rng, (rows, cols)), T[qtype])
        raw = np.ascontiguousarray(raw).view(np.uint8)
    ref = gguf.quants.dequantize(raw, T[qtype]).astype(np.float32, copy=False)
    assert ref.shape == (rows, cols) and np.isfinite(ref).all()
    return raw, ref


def same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (so -0.0 and 0.0 differ)."""
    return torch.equal(a.contiguous().view(torch.int32), torch.from_numpy(np.ascontiguousarray(b)).view(torch.int32))


def test_type_table_matches_gguf_py():
    assert len(sg.GGML_TYPES) == 13
    for t in sg.GGML_TYPES.values():
        assert int(T[t.name]) == t.id
        assert gguf.GGML_QUANT_SIZES[T[t.name]] == (t.block_size, t.type_size)
        assert sg.type_name(t.id) == t.name
    assert sg.type_name(20) == "IQ4_NL" and sg.type_name(34) == "TQ1_0" and sg.type_name(99) == "type 99"


@pytest.mark.parametrize("qtype", QUANTISABLE + K_QUANTS)
def test_dequantize_is_bit_exact_with_gguf_py(qtype):
    rng = np.random.default_rng(sg.TYPE_IDS[qtype])
    block = sg.GGML_TYPES[sg.TYPE_IDS[qtype]].block_size
    rows, cols = (48, 16384) if block == 256 else (96, 1024)  # 3072 blocks (98304 elements for F32/F16/BF16)
    raw, ref = oracle_blocks(rng, qtype, rows, cols)
    got = sg.dequantize(torch.from_numpy(raw), qtype, (rows, cols))
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert same_bits(got, ref)
    # flat data, a type id instead of the name, and a 3-D target shape give the same values
    got3 = sg.dequantize(torch.from_numpy(raw.reshape(-1)), sg.TYPE_IDS[qtype], (2, rows // 2, cols))
    assert same_bits(got3.reshape(rows, cols), ref)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_1", "Q5_0", "Q3_K", "Q6_K"])
def test_dequantize_unaligned_and_strided_data(qtype):
    """Blocks at an odd byte offset (a view of a mapped file) or in a non-contiguous tensor still decode."""
    rng = np.random.default_rng(1)
    raw, ref = oracle_blocks(rng, qtype, 4, 512)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw.reshape(-1))
    assert same_bits(sg.dequantize(buf[1:], qtype, (4, 512)), ref)
    wide = torch.zeros((4, raw.shape[1] * 2), dtype=torch.uint8)
    wide[:, ::2] = torch.from_numpy(raw)
    assert same_bits(sg.dequantize(wide[:, ::2], qtype, (4, 512)), ref)


def test_dequantize_output_dtype():
    rng = np.random.default_rng(2)
    raw, ref = oracle_blocks(rng, "Q4_K", 8, 512)
    data = torch.from_numpy(raw)
    want = torch.from_numpy(ref).to(torch.bfloat16)  # float32 first, then one rounding to bf16
    assert torch.equal(sg.dequantize(data, "Q4_K", (8, 512), torch.bfloat16), want)
    assert sg.dequantize(data, "Q4_K", (8, 512), torch.float16).dtype == torch.float16
    raw16 = np.arange(8, dtype=np.float16).view(np.uint8)
    out16 = sg.dequantize(torch.from_numpy(raw16), "F16", (2, 4), torch.float16)
    assert out16.dtype == torch.float16 and out16[1, 3] == 7


def test_dequantize_errors():
    blocks = torch.zeros(18 * 4, dtype=torch.uint8)
    for qtype, name in ((20, "IQ4_NL"), (34, "TQ1_0")):
        with pytest.raises(CheckpointError, match=rf"'blocks\.0\.ffn\.0\.weight'.*{name} \({qtype}\)"):
            sg.dequantize(blocks, qtype, (4, 32), name="blocks.0.ffn.0.weight")
    with pytest.raises(CheckpointError, match="IQ4_NL"):
        sg.dequantize(blocks, 20, (4, 32))
    with pytest.raises(CheckpointError, match=r"'w'.*72 bytes of Q4_0 cannot hold shape \[4, 64\]"):
        sg.dequantize(blocks, "Q4_0", (4, 64), name="w")
    with pytest.raises(CheckpointError, match="cannot hold shape"):
        sg.dequantize(torch.zeros(18 * 3, dtype=torch.uint8), "Q4_0", (2, 48))  # rows not a multiple of 32
    with pytest.raises(InputError, match="uint8"):
        sg.dequantize(torch.zeros(4, dtype=torch.float32), "F32", (4,))
    with pytest.raises(CheckpointError, match="not supported"):
        sg.dequantize(blocks, "Q9_9", (4, 32))


def test_gguf_weight():
    rng = np.random.default_rng(3)
    raw, ref = oracle_blocks(rng, "Q5_K", 6, 512)
    w = sg.GGUFWeight(torch.from_numpy(raw), 13, (6, 512), name="blocks.0.self_attn.q.weight")
    assert w.type_name == "Q5_K" and w.qtype == 13 and w.shape == torch.Size([6, 512])
    assert w.nbytes == raw.size == 6 * 2 * 176 and w.numel() == 6 * 512
    assert same_bits(w.dequantize(), ref)
    assert torch.equal(w.dequantize(torch.bfloat16), torch.from_numpy(ref).to(torch.bfloat16))
    assert w.to("cpu") is w and w.device == torch.device("cpu")
    moved = w.to("meta")  # another device without needing one: data moves, the description stays
    assert moved is not w and moved.device.type == "meta" and w.device.type == "cpu"
    assert (moved.qtype, moved.shape, moved.name, moved.nbytes) == (w.qtype, w.shape, w.name, w.nbytes)
    assert moved.dequantize(torch.float16).shape == (6, 512)  # torch ops only: runs on any device
    assert same_bits(w.dequantize(device="cpu"), ref)
    assert "Q5_K" in repr(w) and "blocks.0.self_attn.q.weight" in repr(w)
    with pytest.raises(InputError):
        sg.GGUFWeight(torch.zeros(4), "Q8_0", (4,))


def test_gguf_weight_on_cuda_matches():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(4)
    for qtype in QUANTISABLE + K_QUANTS:
        raw, ref = oracle_blocks(rng, qtype, 16, 1024)
        assert same_bits(sg.dequantize(torch.from_numpy(raw).cuda(), qtype, (16, 1024)).cpu(), ref), qtype


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------

TOKENS = ["<pad>", "</s>", "▁a", "▁video", "é"]


def write_wan_gguf(path, rng, extra=()):
    """A small Wan-like GGUF; returns {name: (ggml type name, torch shape, float32 values)}."""
    w = gguf.GGUFWriter(path, arch="wan")
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32("general.file_type", 15)
    w.add_string("general.name", "tiny wan")
    w.add_float32("wan.test_eps", 1e-6)
    w.add_bool("wan.test_flag", True)
    w.add_int32("wan.test_negative", -7)
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.25, 3.0, 0.5])
    w.add_array("wan.test_ints", [1, 2, 3])
    expect = {}
    patch = rng.standard_normal((8, 4, 1, 2, 2)).astype(np.float32)  # [D, in_dim, 1, 2, 2], as fix_5d_tensors
    w.add_tensor("patch_embedding.weight", patch)
    expect["patch_embedding.weight"] = ("F32", (8, 4, 1, 2, 2), patch)
    bias = rng.standard_normal(8).astype(np.float16)
    w.add_tensor("patch_embedding.bias", bias)
    expect["patch_embedding.bias"] = ("F16", (8,), bias.astype(np.float32))
    for name, qtype, shape in (("blocks.0.self_attn.q.weight", "Q8_0", (8, 64)),
                               ("blocks.0.ffn.0.weight", "Q4_K", (4, 512)),
                               ("blocks.0.ffn.2.weight", "Q5_0", (3, 96)),
                               ("blocks.0.modulation", "BF16", (1, 6, 8))):
        raw, ref = oracle_blocks(rng, qtype, int(np.prod(shape[:-1])), shape[-1])
        w.add_tensor(name, raw.reshape(*shape[:-1], -1), raw_dtype=T[qtype])
        expect[name] = (qtype, shape, ref.reshape(shape))
    for name, array, raw_dtype in extra:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


def test_read_gguf_roundtrip(tmp_path):
    path = tmp_path / "wan-tiny-Q4_K_M.gguf"
    ints = np.arange(6, dtype=np.int32).reshape(2, 3)
    expect = write_wan_gguf(path, np.random.default_rng(5), extra=[("pos_ids", ints, None)])
    tensors, meta = sg.read_gguf(path)
    assert list(tensors) == list(expect) + ["pos_ids"]
    for name, (qtype, shape, values) in expect.items():
        t = tensors[name]
        if qtype in ("F32", "F16", "BF16"):
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
            assert isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape, name
            assert t.untyped_storage().nbytes() == path.stat().st_size  # a view of the mapped file
            assert same_bits(t.float(), values), name
        else:
            assert isinstance(t, sg.GGUFWeight) and t.type_name == qtype and t.shape == shape, name
            assert t.name == name and t.data.dtype == torch.uint8 and t.data.shape[:-1] == shape[:-1]
            assert same_bits(t.dequantize(), values), name
    assert tensors["pos_ids"].dtype == torch.int32 and torch.equal(tensors["pos_ids"], torch.from_numpy(ints))
    assert meta["general.architecture"] == "wan" and sg.gguf_architecture(meta) == "wan"
    assert meta["general.name"] == "tiny wan" and meta["general.file_type"] == 15
    assert meta["wan.test_eps"] == float(np.float32(1e-6)) and meta["wan.test_flag"] is True
    assert meta["wan.test_negative"] == -7 and meta["wan.test_ints"] == [1, 2, 3]
    assert meta["tokenizer.ggml.tokens"] == TOKENS and meta["tokenizer.ggml.scores"] == [0.0, -1.5, -2.25, 3.0, 0.5]
    assert not any(k.startswith("GGUF.") for k in meta)
    for key, value in meta.items():
        assert isinstance(value, (str, int, float, bool, list)), key
    # the mapping is copy-on-write: writing to a loaded tensor leaves the file alone
    before = path.read_bytes()
    tensors["patch_embedding.weight"].zero_()
    assert path.read_bytes() == before


def test_gguf_architecture():
    assert sg.gguf_architecture({"general.architecture": "t5encoder"}) == "t5encoder"
    assert sg.gguf_architecture({"general.architecture": "pig"}) is None
    assert sg.gguf_architecture({"general.architecture": ""}) is None
    assert sg.gguf_architecture({}) is None


def patch_tensor_info(path, name, dims=None, qtype=None):
    """Overwrite a tensor's dims (GGUF order, innermost first) or type id in the file's header."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", data, at + 4, *dims)
    if qtype is not None:
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, qtype)
    path.write_bytes(bytes(data))


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.gguf"
    write_wan_gguf(path, np.random.default_rng(6))
    return path


def test_not_a_gguf(tmp_path):
    for i, content in enumerate((b"", b"GG", b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 40)):
        path = tmp_path / f"bad{i}.gguf"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is not a GGUF file"):
            sg.read_gguf(path)
    with pytest.raises(CheckpointError, match="no such file"):
        sg.read_gguf(tmp_path / "missing.gguf")


def test_truncated_file(tmp_path, good_file):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])  # the last tensor (the BF16 modulation) loses its end
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(cut))}: tensor 'blocks.0.modulation' .*"
                                              r"runs \d+ bytes past the end of the file; the file is truncated"):
        sg.read_gguf(cut)
    cut.write_bytes(data[:60])  # inside the metadata
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(cut))} is truncated"):
        sg.read_gguf(cut)


def test_shape_the_data_cannot_hold(tmp_path, good_file):
    # the last tensor claims more rows than the file has bytes for
    patch_tensor_info(good_file, "blocks.0.modulation", dims=(8, 6, 100))
    with pytest.raises(CheckpointError, match=r"good\.gguf: tensor 'blocks\.0\.modulation' \(BF16 \[100, 6, 8\].*"
                                              r"past the end"):
        sg.read_gguf(good_file)
    # the first tensor claims more rows: its data would run into the next tensor's
    write_wan_gguf(good_file, np.random.default_rng(6))
    patch_tensor_info(good_file, "patch_embedding.weight", dims=(2, 2, 1, 4, 9))
    with pytest.raises(CheckpointError, match=r"good\.gguf: tensor 'patch_embedding\.weight' \(F32 \[9, 4, 1, 2, 2\]"
                                              r".*runs into the data of tensor 'patch_embedding\.bias'"):
        sg.read_gguf(good_file)
    # a quantised row that is not a whole number of blocks
    write_wan_gguf(good_file, np.random.default_rng(6))
    patch_tensor_info(good_file, "blocks.0.self_attn.q.weight", dims=(48, 8))
    with pytest.raises(CheckpointError, match=r"good\.gguf: tensor 'blocks\.0\.self_attn\.q\.weight' has shape "
                                              r"\[8, 48\].*Q8_0 block size 32"):
        sg.read_gguf(good_file)
    # a type id ggml does not define
    write_wan_gguf(good_file, np.random.default_rng(6))
    patch_tensor_info(good_file, "blocks.0.ffn.2.weight", qtype=99)
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.ffn\.2\.weight' has an unknown GGML type id 99"):
        sg.read_gguf(good_file)


def test_unsupported_type_in_a_file(tmp_path):
    path = tmp_path / "iq.gguf"
    iq4 = np.random.default_rng(7).integers(0, 256, size=(2, 2 * 18), dtype=np.uint8)  # 2 rows of 64
    tq1 = np.zeros((1, 54), dtype=np.uint8)  # one TQ1_0 block of 256
    write_wan_gguf(path, np.random.default_rng(7), extra=[("blocks.0.cross_attn.k.weight", iq4, T.IQ4_NL),
                                                          ("blocks.0.cross_attn.v.weight", tq1, T.TQ1_0)])
    tensors, _ = sg.read_gguf(path)
    k, v = tensors["blocks.0.cross_attn.k.weight"], tensors["blocks.0.cross_attn.v.weight"]
    assert (k.type_name, k.shape, v.type_name, v.shape) == ("IQ4_NL", (2, 64), "TQ1_0", (1, 256))
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.cross_attn\.k\.weight' has the GGML type "
                                              r"IQ4_NL \(20\)"):
        k.dequantize()
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.cross_attn\.v\.weight'.*TQ1_0 \(34\)"):
        v.dequantize()
