"""GGUF files: quantised weights (city96's Wan GGUFs, umT5 GGUFs) kept as blocks and dequantised on the fly.

A GGUF file is a header (metadata key/values and one info record per tensor) followed by the tensor data. GGUF
lists dims innermost first; `read_gguf` reverses them into torch order. F32, F16 and BF16 tensors become ordinary
torch tensors; quantised tensors become `GGUFWeight`s, which keep the raw blocks (about 4.5 bits per weight for
Q4_K) and turn them into a float tensor with `dequantize`, once per use.

`dequantize` is written with torch integer and bit operations only, so it runs on the device that holds the
blocks. Its result equals gguf-py's numpy `gguf.quants.dequantize` bit for bit: every float step (fp16 scale
to float32, `d * sc`, then `* q`, then `- dmin * m`) is done in float32 in the same order, and the integer steps
are exact.

Tensor data is memory-mapped copy-on-write (like `checkpoints.py` does for safetensors): pages are read on
first use, and writing to a tensor never changes the file.
"""
from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import CheckpointError, InputError


class GGMLType(NamedTuple):
    """One ggml tensor type: its id in the file, its name, elements per block and bytes per block."""
    id: int
    name: str
    block_size: int
    type_size: int


# The types `dequantize` supports (gguf-py constants.GGMLQuantizationType and GGML_QUANT_SIZES).
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in (
    GGMLType(0, "F32", 1, 4),
    GGMLType(1, "F16", 1, 2),
    GGMLType(2, "Q4_0", 32, 18),  # d:f16, qs[16]
    GGMLType(3, "Q4_1", 32, 20),  # d:f16, m:f16, qs[16]
    GGMLType(6, "Q5_0", 32, 22),  # d:f16, qh:u32, qs[16]
    GGMLType(7, "Q5_1", 32, 24),  # d:f16, m:f16, qh:u32, qs[16]
    GGMLType(8, "Q8_0", 32, 34),  # d:f16, q[32]:i8
    GGMLType(10, "Q2_K", 256, 84),  # scales[16], qs[64], d:f16, dmin:f16
    GGMLType(11, "Q3_K", 256, 110),  # hmask[32], qs[64], scales[12], d:f16
    GGMLType(12, "Q4_K", 256, 144),  # d:f16, dmin:f16, scales[12], qs[128]
    GGMLType(13, "Q5_K", 256, 176),  # d:f16, dmin:f16, scales[12], qh[32], qs[128]
    GGMLType(14, "Q6_K", 256, 210),  # ql[128], qh[64], scales[16]:i8, d:f16
    GGMLType(30, "BF16", 1, 2),
)}
TYPE_IDS: dict[str, int] = {t.name: t.id for t in GGML_TYPES.values()}

# Names of the other ggml types, for error messages only.
_OTHER_TYPE_NAMES = {
    9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}
# Integer / f64 tensors GGUF stores as plain arrays; read_gguf returns them as ordinary tensors.
_PLAIN_INT_DTYPES = {24: torch.int8, 25: torch.int16, 26: torch.int32, 27: torch.int64, 28: torch.float64}
_PLACEHOLDER_ARCHS = ("pig", "cow")  # written by early city96 converters instead of the model family


def type_name(qtype: int) -> str:
    """The ggml name of a type id ("Q4_K"), or "type <id>" for ids ggml does not define."""
    qtype = int(qtype)
    if qtype in GGML_TYPES:
        return GGML_TYPES[qtype].name
    return _OTHER_TYPE_NAMES.get(qtype, f"type {qtype}")


def _type_id(qtype: int | str) -> int:
    if isinstance(qtype, str):
        if qtype.upper() not in TYPE_IDS:
            raise CheckpointError(f"GGML type {qtype!r} is not supported; supported: {', '.join(TYPE_IDS)}")
        return TYPE_IDS[qtype.upper()]
    return int(qtype)


def _unsupported(qtype: int, name: str | None) -> CheckpointError:
    what = f"tensor {name!r} has" if name else "this tensor has"
    return CheckpointError(f"{what} the GGML type {type_name(qtype)} ({int(qtype)}), which cannot be dequantised "
                           f"here; supported: {', '.join(TYPE_IDS)}. Use a GGUF file with one of those types.")


# ----------------------------------------------------------------------------------------------------------------
# dequantisation: each _q* function fills float32 `out` [n, block_size] from uint8 `blocks` [n, type_size]
# ----------------------------------------------------------------------------------------------------------------

CPU_CHUNK_BLOCKS = 8192  # blocks dequantised at a time on the CPU (2M values: 8 MB of float32 intermediates)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _scale(out: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
           sign: int = 1) -> None:
    """out = float32(q) · d (+ m, or - m when sign is -1): separate float32 steps in gguf-py's order, in place."""
    out = out.view(q.shape)
    out.copy_(q)
    out.mul_(d)
    if m is not None and sign > 0:
        out.add_(m)
    elif m is not None:
        out.sub_(m)


def _nibbles(x: torch.Tensor) -> torch.Tensor:
    """[..., k] uint8 -> [..., 2, k]: the low nibbles, then the high nibbles."""
    out = torch.empty((*x.shape[:-1], 2, x.shape[-1]), dtype=torch.uint8, device=x.device)
    torch.bitwise_and(x, 15, out=out[..., 0, :])
    torch.bitwise_right_shift(x, 4, out=out[..., 1, :])
    return out


def _fields(x: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., k] uint8 -> [..., 8 // bits, k]: field s holds bits [s·bits, (s+1)·bits) of each byte."""
    # one scalar shift per field, stacked: a broadcast tensor-by-tensor shift is not vectorised on the CPU (2.3x)
    out = torch.stack([x >> s for s in range(0, 8, bits)], dim=-2)
    return out.bitwise_and_((1 << bits) - 1)


def _bits_u32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 holding a little-endian u32 -> [n, 32] uint8: bit j of the u32 at index j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (qh.unsqueeze(-1) >> shifts).bitwise_and_(1).reshape(qh.shape[0], 32)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K scale bytes [n, 12] -> (sc, min), each [n, 8] uint8 (6 bits each)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(blocks, 0)  # [n, 1]
    _scale(out, blocks[:, 2:].view(torch.int8), d)


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(blocks[:, 2:]).view(torch.int8).sub_(8)  # [n, 2, 16]
    _scale(out, q, _f16(blocks, 0).unsqueeze(-1))


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(blocks[:, 4:])  # [n, 2, 16]
    _scale(out, q, _f16(blocks, 0).unsqueeze(-1), _f16(blocks, 2).unsqueeze(-1))


def _q5(blocks: torch.Tensor, qs_start: int) -> torch.Tensor:
    """The 5-bit values [n, 32] uint8 of Q5_0 / Q5_1: nibble | (bit j of qh) << 4."""
    n = blocks.shape[0]
    q = _nibbles(blocks[:, qs_start:]).view(n, 32)
    return q.bitwise_or_(_bits_u32(blocks[:, qs_start - 4:qs_start]).bitwise_left_shift_(4))


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _q5(blocks, 6).view(torch.int8).sub_(16)
    _scale(out, q, _f16(blocks, 0))


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _scale(out, _q5(blocks, 8), _f16(blocks, 0), _f16(blocks, 2))


def _q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    dl = torch.mul(scales & 15, _f16(blocks, 80)).unsqueeze(-1)  # [n, 16, 1]
    ml = torch.mul(scales >> 4, _f16(blocks, 82)).unsqueeze(-1)
    q = _fields(blocks[:, 16:80].reshape(n, 2, 32), 2).view(n, 16, 16)  # per 128: 4 bit pairs x 32 bytes
    _scale(out, q, dl, ml, -1)


def _q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 96:104]).view(n, 16)  # low 4 bits of the 16 scales
    high = _fields(blocks[:, 104:108], 2).view(n, 16)  # high 2 bits
    scales = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = torch.mul(scales, _f16(blocks, 108)).unsqueeze(-1)  # [n, 16, 1]
    q = _fields(blocks[:, 32:96].reshape(n, 2, 32), 2).view(n, 16, 16)
    hbit = _fields(blocks[:, 0:32], 1).view(n, 16, 16)  # bit (j // 32) of hmask[j % 32]
    q = q.bitwise_or_(hbit.bitwise_left_shift_(2)).view(torch.int8).sub_(4)  # q - 4·(1 - hbit)
    _scale(out, q, dl)


def _k_dm(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K per-sub-block d·sc and dmin·min, each float32 [n, 8, 1]."""
    sc, mn = _k_scales(blocks[:, 4:16])
    return torch.mul(sc, _f16(blocks, 0)).unsqueeze(-1), torch.mul(mn, _f16(blocks, 2)).unsqueeze(-1)


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d, dm = _k_dm(blocks)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).view(n, 8, 32)  # per 64: 32 low nibbles, 32 high
    _scale(out, q, d, dm, -1)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d, dm = _k_dm(blocks)
    q = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).view(n, 8, 32)
    q.bitwise_or_(_fields(blocks[:, 16:48], 1).bitwise_left_shift_(4))  # bit (j // 32) of qh[j % 32]
    _scale(out, q, d, dm, -1)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = torch.mul(blocks[:, 192:208].view(torch.int8), _f16(blocks, 208)).unsqueeze(-1)  # [n, 16, 1]
    low = _nibbles(blocks[:, 0:128].reshape(n, 2, 64)).view(n, 8, 32)
    high = _fields(blocks[:, 128:192].reshape(n, 2, 32), 2).view(n, 8, 32)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32).view(n, 16, 16)
    _scale(out, q, d)


_BLOCK_DEQUANT = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k,
                  14: _q6_k}


def _reinterpret(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of `data` as `dtype` (a view when the alignment allows, else a copy)."""
    flat = data.reshape(-1)
    try:
        return flat.view(dtype)
    except RuntimeError:  # storage offset not a multiple of the element size
        return flat.clone().view(dtype)


def dequantize(data: torch.Tensor, qtype: int | str, shape: Sequence[int], dtype: torch.dtype = torch.float32, *,
               name: str | None = None) -> torch.Tensor:
    """The tensor of torch `shape` stored as ggml `qtype` blocks in `data` (uint8, any shape, any device).

    Computed in float32 on data's device (on the CPU a chunk of blocks at a time), then cast to `dtype`; equal bit
    for bit to gguf-py's numpy `gguf.quants.dequantize`. F32/F16/BF16 results may share memory with `data`. `name`
    (the tensor's) appears in errors.
    """
    qtype = _type_id(qtype)
    shape = torch.Size(shape)
    if data.dtype != torch.uint8:
        raise InputError(f"GGUF blocks must be a uint8 tensor, got {data.dtype}")
    if qtype not in GGML_TYPES:
        raise _unsupported(qtype, name)
    t = GGML_TYPES[qtype]
    numel = shape.numel()
    if (shape[-1] if shape else 1) % t.block_size or data.numel() != numel // t.block_size * t.type_size:
        what = f"tensor {name!r}" if name else "a GGUF tensor"
        raise CheckpointError(f"{what}: {data.numel()} bytes of {t.name} cannot hold shape {list(shape)} "
                              f"(rows of {t.block_size}-element blocks, {t.type_size} bytes each); the file is "
                              f"corrupt")
    if qtype == 0:
        return _reinterpret(data, torch.float32).view(shape).to(dtype)
    if qtype in (1, 30):
        return _reinterpret(data, torch.float16 if qtype == 1 else torch.bfloat16).view(shape).to(dtype)
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=data.device)
    blocks = data.reshape(-1, t.type_size)  # [n, type_size]
    n = blocks.shape[0]
    out = torch.empty((n, t.block_size), dtype=dtype, device=data.device)
    # On the CPU a chunk at a time, so that the float32 intermediates stay in the cache (twice as fast for a 14M
    # value tensor here); on a GPU in one go (one kernel per step).
    chunk = min(n, CPU_CHUNK_BLOCKS) if data.device.type == "cpu" else n
    work = out if dtype == torch.float32 else torch.empty((chunk, t.block_size), dtype=torch.float32,
                                                              device=data.device)
    for i in range(0, n, chunk):
        part = out[i:i + chunk] if work is out else work[:min(chunk, n - i)]
        _BLOCK_DEQUANT[qtype](blocks[i:i + chunk], part)
        if work is not out:
            out[i:i + chunk].copy_(part)
    return out.view(shape)


def row_bytes(qtype: int | str, elements: int) -> int:
    """Bytes of one row of `elements` values stored as `qtype` (which must divide it into whole blocks)."""
    qtype = _type_id(qtype)
    if qtype not in GGML_TYPES:
        raise _unsupported(qtype, None)
    t = GGML_TYPES[qtype]
    if elements % t.block_size:
        raise CheckpointError(f"rows of {elements} values do not split into {t.name} blocks of {t.block_size}")
    return elements // t.block_size * t.type_size


class GGUFWeight:
    """A quantised tensor as stored in a GGUF file: raw uint8 blocks, a ggml type id and the torch shape.

    `data` is uint8 of shape [*shape[:-1], bytes per row] (a view of the mapped file after `read_gguf`).
    """

    __slots__ = ("data", "name", "qtype", "shape")

    def __init__(self, data: torch.Tensor, qtype: int | str, shape: Sequence[int], name: str | None = None):
        if data.dtype != torch.uint8:
            raise InputError(f"GGUFWeight data must be uint8, got {data.dtype}")
        self.data = data
        self.qtype = _type_id(qtype)
        self.shape = torch.Size(shape)
        self.name = name

    @property
    def type_name(self) -> str:
        """The ggml type name, e.g. "Q4_K"."""
        return type_name(self.qtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored blocks."""
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        """Elements of the dequantised tensor."""
        return math.prod(self.shape)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GGUFWeight:
        """This weight with its blocks on `device` (self when they are there already)."""
        data = self.data.to(device, non_blocking=non_blocking)
        return self if data is self.data else GGUFWeight(data, self.qtype, self.shape, self.name)

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The full tensor in `dtype`, computed on `device` (default: where the blocks are)."""
        data = self.data if device is None else self.data.to(device)
        return dequantize(data, self.qtype, self.shape, dtype, name=self.name)

    def __repr__(self) -> str:
        name = f"{self.name!r}, " if self.name else ""
        return f"GGUFWeight({name}{self.type_name}, shape={list(self.shape)}, {self.nbytes} bytes, {self.device})"


# ----------------------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------------------

def gguf_architecture(metadata: dict[str, object]) -> str | None:
    """The model family `general.architecture` names ("wan", "t5encoder"), or None when it is missing or a
    placeholder ("pig", "cow" from early city96 converters): then detect the family by tensor names."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch.strip() or arch.strip().lower() in _PLACEHOLDER_ARCHS:
        return None
    return arch.strip().lower()


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """(block size, bytes per block) of every ggml type the installed gguf package knows."""
    from gguf.constants import GGML_QUANT_SIZES
    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


def _field_value(path: Path, field) -> object:
    """A GGUFReader metadata field as a plain Python value (str, int, float, bool, or a flat list of them)."""
    from gguf.constants import GGUFValueType

    def text(part) -> str:
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: metadata {field.name!r} holds a string that is not UTF-8; the file is "
                                  f"corrupt") from None

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) == 1:  # an empty array records no element type
            return []
        if types[-1] == GGUFValueType.STRING:
            return [text(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]  # nested arrays come out flat
    if types[0] == GGUFValueType.STRING:
        return text(field.parts[-1])
    return field.parts[-1].tolist()[0]


def _mapped_bytes(path: Path, size: int) -> torch.Tensor:
    """The whole file as a uint8 tensor over a copy-on-write memory map."""
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    return torch.empty((0,), dtype=torch.uint8).set_(storage)


def _describe(name: str, qtype: int, shape: Sequence[int], nbytes: int) -> str:
    return f"tensor {name!r} ({type_name(qtype)} {list(shape)}, {nbytes} bytes)"


def architecture_of(path: str | Path) -> str | None:
    """`general.architecture` of a GGUF file, read from its header alone (None: absent, a placeholder, or not a
    readable GGUF)."""
    try:
        import gguf

        field = gguf.GGUFReader(path, "r").fields.get("general.architecture")
        return gguf_architecture({"general.architecture": _field_value(Path(path), field)} if field else {})
    except Exception:  # any unreadable file: the caller only wants a hint
        return None


def read_gguf(path: str | Path) -> tuple[dict[str, torch.Tensor | GGUFWeight], dict[str, object]]:
    """The tensors (by name, torch shapes) and the metadata (by key, plain Python values) of a GGUF file.

    F32/F16/BF16 (and integer) tensors are ordinary tensors viewing the mapped file; other types are
    `GGUFWeight`s (their type is checked only when dequantised). GGUF's own `GGUF.*` counters are left out.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); check that the "
                              f"download finished and that this is a .gguf model")
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"reading {path.name} needs the gguf package: `pip install gguf`") from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:
        raise CheckpointError(_diagnose(path, size) or f"{path} could not be read as GGUF "
                              f"({type(e).__name__}: {e}); re-download it") from None
    if reader.byte_order == "S":
        raise CheckpointError(f"{path} is a big-endian GGUF file; only little-endian files can be read")
    metadata = {name: _field_value(path, field) for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    sizes = _quant_sizes()
    file_bytes = _mapped_bytes(path, size)
    tensors: dict[str, torch.Tensor | GGUFWeight] = {}
    spans = []
    for info in reader.tensors:
        name, qtype = info.name, int(info.tensor_type)
        shape = tuple(int(d) for d in reversed(info.shape.tolist()))
        block_size, type_size = sizes[qtype]
        nbytes = math.prod(shape) // block_size * type_size
        start = int(info.data_offset)
        if nbytes != info.data.nbytes or start + nbytes > size:
            raise CheckpointError(f"{path}: {_describe(name, qtype, shape, nbytes)} does not fit the file's "
                                  f"{info.data.nbytes} bytes for it; the file is truncated or corrupt")
        spans.append((start, start + nbytes, name, qtype, shape))
        raw = file_bytes[start:start + nbytes]
        if qtype in (0, 1, 30) or qtype in _PLAIN_INT_DTYPES:
            dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}.get(qtype) or _PLAIN_INT_DTYPES[qtype]
            tensors[name] = _reinterpret(raw, dtype).view(shape)
        else:
            row_bytes = shape[-1] // block_size * type_size
            tensors[name] = GGUFWeight(raw.view(*shape[:-1], row_bytes), qtype, shape, name)
    spans.sort()
    for (start, end, name, qtype, shape), (next_start, _, other, _, _) in itertools.pairwise(spans):
        if end > next_start:
            raise CheckpointError(f"{path}: {_describe(name, qtype, shape, end - start)} runs into the data of "
                                  f"tensor {other!r}; the header is corrupt; re-download the file")
    return tensors, metadata


class _Truncated(Exception):
    pass


class _Header:
    """A little-endian reader over a file that raises `_Truncated` instead of returning short reads."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0

    def read(self, n: int) -> bytes:
        if n > self.size - self.pos:
            raise _Truncated(f"the header needs {n} bytes at byte {self.pos}, the file has {self.size}")
        self.pos += n
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise _Truncated(f"the header needs {n} bytes at byte {self.pos}, the file has {self.size}")
        self.pos += n
        self.f.seek(n, 1)

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return self.read(self.unpack("Q"))


_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def _skip_value(h: _Header, vtype: int, key: str) -> None:
    if vtype in _VALUE_SIZES:
        h.skip(_VALUE_SIZES[vtype])
    elif vtype == _STRING:
        h.string()
    elif vtype == _ARRAY:
        itype, count = h.unpack("I"), h.unpack("Q")
        if itype in _VALUE_SIZES:
            h.skip(count * _VALUE_SIZES[itype])
        else:
            for _ in range(count):
                _skip_value(h, itype, key)
    else:
        raise ValueError(f"metadata {key!r} has an unknown value type {vtype}")


def _diagnose(path: Path, size: int) -> str | None:
    """Why a GGUF file cannot be read, from a header parse of our own; None when no reason is found."""
    sizes = _quant_sizes()
    try:
        with open(path, "rb") as f:
            h = _Header(f, size)
            h.skip(4)  # the magic, checked by the caller
            version = h.unpack("I")
            if version & 0xFFFF == 0:
                return f"{path} is a big-endian GGUF file; only little-endian files can be read"
            if version not in (2, 3):
                return f"{path} is GGUF version {version}; only versions 2 and 3 can be read"
            n_tensors, n_kv = h.unpack("Q"), h.unpack("Q")
            alignment = 32
            for _ in range(n_kv):
                key = h.string().decode("utf-8", "replace")
                vtype = h.unpack("I")
                if key == "general.alignment" and vtype == 4:
                    alignment = h.unpack("I")
                else:
                    _skip_value(h, vtype, key)
            infos = []
            for _ in range(n_tensors):
                name = h.string().decode("utf-8", "replace")
                n_dims = h.unpack("I")
                if n_dims > 16:
                    return f"{path}: tensor {name!r} claims {n_dims} dims; the header is corrupt; re-download it"
                dims = [h.unpack("Q") for _ in range(n_dims)]
                infos.append((name, dims, h.unpack("I"), h.unpack("Q")))
    except _Truncated as e:
        return f"{path} is truncated ({e}); re-download it"
    except ValueError as e:
        return f"{path} has a corrupt header ({e}); re-download it"
    if alignment <= 0 or alignment & (alignment - 1):
        return f"{path} has an invalid general.alignment {alignment}; re-download it"
    data_start = -(-h.pos // alignment) * alignment
    for name, dims, qtype, offset in infos:
        shape = list(reversed(dims))
        if qtype not in sizes:
            return (f"{path}: tensor {name!r} has an unknown GGML type id {qtype}; the file is corrupt or needs a "
                    f"newer gguf package")
        block_size, type_size = sizes[qtype]
        if (dims[0] if dims else 1) % block_size:
            return (f"{path}: tensor {name!r} has shape {shape}, whose last dim is not a multiple of the "
                    f"{type_name(qtype)} block size {block_size}; the header is corrupt; re-download the file")
        nbytes = math.prod(dims) // block_size * type_size
        end = data_start + offset + nbytes
        if end > size:
            return (f"{path}: {_describe(name, qtype, shape, nbytes)} runs {end - size} bytes past the end of the "
                    f"file; the file is truncated (or its header corrupt); re-download it")
    return None
