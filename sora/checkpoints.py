"""Reading checkpoint files without executing code.

Formats: safetensors (one file, or shards listed by a `*.safetensors.index.json`), and torch pickles (`.pth`,
`.pt`, `.ckpt`, `.bin`) only through `torch.load(weights_only=True)`, which refuses pickled code. Safetensors are
memory-mapped: tensors point into the mapped file and pages are read when a tensor is first used, so a model
loaded with `load_into(..., assign=True)` peaks close to the size of its weights.

Layouts are handled by the model modules (`dit.py`, `vae.py`, `text.py`); this module only offers the shared
pieces: open a file, strip a known prefix, and load a state dict into a module with errors that name the key.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from .errors import CheckpointError

if TYPE_CHECKING:
    from . import ops

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
GGUF_SUFFIX = ".gguf"

StateDict = dict[str, torch.Tensor]


def _check_safetensors_file(path: Path) -> dict:
    """Parse the header by hand so that a truncated or corrupt file gives a message a user understands."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes); the download is incomplete")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path} is not a valid safetensors file (corrupt header length); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header; re-download it")
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_len > size:
        missing = 8 + header_len + data_len - size
        raise CheckpointError(f"{path} is truncated: {missing} bytes are missing at the end; re-download it")
    return header


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file, or the scalar metadata of a GGUF file as strings
    ("general.architecture": "wan", ...); {} for other formats or none."""
    path = Path(path)
    if path.suffix == GGUF_SUFFIX:
        from .gguf import read_gguf
        return {k: str(v) for k, v in read_gguf(path)[1].items() if isinstance(v, (str, int, float))}
    if path.suffix not in SAFETENSORS_SUFFIXES:
        return {}
    return dict(_check_safetensors_file(path).get("__metadata__") or {})


def _load_safetensors(path: Path) -> StateDict:
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError for broken files
        raise CheckpointError(f"{path} could not be read as safetensors: {e}") from None


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _unsafe_or_broken(path: Path, error: Exception) -> CheckpointError:
    """Why a pickle was refused, in our words: torch's own message advises loading it with weights_only=False,
    which would run whatever code the file holds, so it is never passed on."""
    found = _GLOBAL.search(str(error))
    if found or "weights_only" in str(error) or "Weights only load failed" in str(error):
        what = f" ({found[1]})" if found else ""
        return CheckpointError(f"{path} is a pickle that holds code or objects{what}, not just tensors; this pack "
                               "never runs code from a model file. Use a safetensors file of the model (convert "
                               "it only where you trust its source).")
    return CheckpointError(f"{path} could not be read as a tensor file ({type(error).__name__}: {error}); it may be "
                           "truncated or not a model file. Only plain tensor files are accepted; safetensors is "
                           "best.")


def _load_pickle(path: Path) -> StateDict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "zip" in str(e).lower() or "mmap" in str(e).lower():  # legacy (non-zip) pickles cannot be mapped
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e2:
                raise _unsafe_or_broken(path, e2) from None
        else:
            raise _unsafe_or_broken(path, e) from None
    except Exception as e:  # pickle.UnpicklingError for files that need code execution, EOFError when truncated
        raise _unsafe_or_broken(path, e) from None
    for key in ("state_dict", "model", "module"):  # common wrappers around the tensor dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return obj


def _load_sharded(index_path: Path) -> StateDict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path} is not a valid shard index ({e})") from None
    state_dict: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"{index_path} lists the shard {shard}, which is missing next to it")
        state_dict.update(load_state_dict(shard_path))
    missing = set(weight_map) - set(state_dict)
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed in the index are missing from the shards: "
                              f"{sorted(missing)[:5]}")
    return state_dict


def load_state_dict(path: str | Path) -> StateDict:
    """All tensors of a checkpoint as a dict; safetensors and GGUF stay memory-mapped (GGUF's quantised tensors as
    `sora.gguf.GGUFWeight`s).

    `path` is a file, a `*.index.json` shard index, or a folder holding one index or one weights file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors.index.json")) or sorted(
            p for p in path.iterdir() if p.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        if len(candidates) != 1:
            raise CheckpointError(f"{path} is a folder with {len(candidates)} weight files or shard indexes; "
                                  "point to one file")
        path = candidates[0]
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    if path.suffix == GGUF_SUFFIX:
        from .gguf import read_gguf
        return read_gguf(path)[0]
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; "
                          f"use one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (GGUF_SUFFIX,)}")


# What a checkpoint holds, told by a fragment of its key names; the first match wins, so the specific come first.
_DIT = "a Wan diffusion model (the diffusion transformer, DiT); load it with Sora Load Diffusion Model"
_VAE = "a Wan video VAE; load it with Sora Load VAE"
_T5 = "a T5 / umT5 text encoder; load it with Sora Load Text Encoder"
FILE_KINDS = (
    (".lora_down.", "a LoRA; load it with Sora Load LoRA"),
    (".lora_A.", "a LoRA; load it with Sora Load LoRA"),
    ("lora_unet_", "a LoRA; load it with Sora Load LoRA"),
    ("vision_model.", "a CLIP vision encoder; load it with Sora Load CLIP Vision"),
    ("visual.transformer.", "a CLIP vision encoder; load it with Sora Load CLIP Vision"),
    ("text_model.encoder.", "a CLIP text encoder, which Wan does not use"),
    ("head.modulation", _DIT),
    ("condition_embedder.", _DIT),
    ("blocks.0.self_attn.q.weight", _DIT),
    ("decoder.middle.0.residual.", _VAE),
    ("decoder.conv1.", _VAE),
    ("encoder.downsamples.", _VAE),
    ("decoder.mid_block.", _VAE),
    ("decoder.mid.block_1.", "an image VAE (Stable Diffusion / Flux layout), not the Wan video VAE"),
    ("SelfAttention.q.weight", _T5),
    ("encoder.block.0.layer.0.", _T5),
    ("shared.weight", _T5),
    ("blocks.0.attn.q.weight", _T5),
    ("token_embedding.", "a text encoder; load it with Sora Load Text Encoder"),
    ("embeddings.word_embeddings", "a BERT-style text encoder, which Wan does not use"),
    ("layer_scale", "a DINOv2 / DINOv3 image encoder, which Wan does not use"),
    ("spatial_blocks.", "an Open-Sora STDiT, which is not supported"),
    ("x_embedder.", "an Open-Sora / DiT-style model, which is not supported"),
    ("double_blocks.", "an MMDiT (Open-Sora 2.0 / Flux / HunyuanVideo style), which is not supported"),
)


def describe(state_dict: StateDict | list[str], expected: str) -> str:
    """What a file that is not a `expected` (e.g. "Wan VAE") holds: "it looks like <kind> (it has '<key>')", or
    that none of its tensors has the names of one."""
    keys = list(state_dict)
    for fragment, kind in FILE_KINDS:
        example = next((k for k in keys if fragment in k), None)
        if example is not None:
            return f"it looks like {kind} (it has {example!r})"
    shown = ", ".join(repr(k) for k in keys[:3]) or "none"
    return f"none of its {len(keys)} tensors has the names of a {expected} (first keys: {shown})"


def strip_prefix(state_dict: StateDict, prefixes: tuple[str, ...], anchor: str) -> StateDict:
    """Remove the first prefix p for which `p + anchor` is a key (anchor: a key every file of the family has).

    Returns the dict unchanged when the anchor is present without a prefix; keys outside the prefix are dropped
    (a full ComfyUI checkpoint also holds the VAE and the text encoder).
    """
    if anchor in state_dict:
        return state_dict
    for prefix in prefixes:
        if prefix + anchor in state_dict:
            n = len(prefix)
            return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def build(make: Callable[[], nn.Module], state_dict: StateDict, *, what: str, source: str | Path = "checkpoint",
          weight_dtype: torch.dtype | ops.Fp8Matmul | None = None) -> nn.Module:
    """`make()` built on the meta device (no memory), the file's tensors assigned into it (`load_into`), and its
    Linear weights stored in `weight_dtype` when one is given (`sora.ops.cast_weights`): a torch dtype, or
    `sora.ops.FP8_E4M3FN_FAST` for scaled e4m3 weights multiplied in fp8 where the GPU has fp8 units."""
    from . import ops  # ops defines layers; this module only reads files

    with torch.device("meta"):
        model = make()
    state_dict = _place_quantised(model, state_dict, what=what, source=source)
    load_into(model, state_dict, what=what, source=source)
    if weight_dtype is not None:
        ops.cast_weights(model, weight_dtype)
    return model


def _place_quantised(model: nn.Module, state_dict: StateDict, *, what: str, source: str | Path) -> StateDict:
    """GGUF's quantised tensors: a Linear weight keeps its blocks (`sora.ops.quantize`, dequantised per call); any
    other tensor (an embedding table) is dequantised here, to float16 as ComfyUI-GGUF does."""
    from . import ops
    from .gguf import GGUFWeight

    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, GGUFWeight):
            out[key] = value
            continue
        owner, _, leaf = key.rpartition(".")
        layer = model.get_submodule(owner) if _has_submodule(model, key) else None
        if isinstance(layer, ops.Linear) and leaf == "weight":
            if value.shape != layer.weight_shape:
                raise CheckpointError(f"{source}: tensor {key!r} has shape {list(value.shape)}, the {what} expects "
                                      f"{list(layer.weight_shape)}")
            ops.quantize(layer, value.qtype)
            out[key] = value.data
        else:
            out[key] = value.dequantize(torch.float16)
    return out


def load_into(module: nn.Module, state_dict: StateDict, *, what: str, source: str | Path = "checkpoint",
              ignore: tuple[str, ...] = ()) -> None:
    """Load tensors into `module` by assignment (no copy, dtype as stored), checking every name and shape.

    fp8 "scaled" files: a `<layer>.scale_weight` key becomes that layer's `scale_weight` buffer (see `ops.Linear`).
    Keys named in `ignore` (exact names) are dropped. Errors name the first offending key and the file.
    """
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in ignore and k != "scaled_fp8" and not k.endswith(".scale_input")}
    own = module.state_dict(keep_vars=True)
    scale_keys = [k for k in state_dict if k.endswith(".scale_weight") and k not in own]
    for key in scale_keys:
        layer = module.get_submodule(key[: -len(".scale_weight")]) if _has_submodule(module, key) else None
        if layer is None or not hasattr(layer, "scale_weight"):
            raise CheckpointError(f"{source}: {key} scales a layer this {what} does not have")
        layer.scale_weight = torch.empty((), dtype=torch.float32, device="meta")
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state_dict and not k.endswith(".scale_weight")]
    unexpected = [k for k in state_dict if k not in own]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} for a {what} "
                              f"({len(unexpected)} unexpected in all); is this the right kind of file?")
    if missing:
        raise CheckpointError(f"{source}: the {what} needs {missing[0]!r}, which the file lacks "
                              f"({len(missing)} missing in all); the file is incomplete or of another model")
    for key, value in state_dict.items():
        expected = own[key].shape
        if value.shape != expected:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {list(value.shape)}, "
                                  f"the {what} expects {list(expected)}")
    module.load_state_dict(state_dict, strict=False, assign=True)


def _has_submodule(module: nn.Module, key: str) -> bool:
    try:
        module.get_submodule(key.rsplit(".", 1)[0])
        return True
    except AttributeError:
        return False
