"""The nodes on the tiny stand-in models: loaders and their cache, text encode in core's structure, the scheduler's
defaults, the sampler's plumbing (seeds, frame conditioning, experts, progress, previews, cancel), VAE encode and
decode, and prompt expansion."""
import dataclasses
import shutil

import pytest
import torch
from PIL import Image

from sora import memory, model_cache, runtime, schedules, standins, text
from sora.errors import CheckpointError, InputError, Interrupted
from sora.handle import HIGH_NOISE, LOW_NOISE, SINGLE, MemorySettings
from sora.nodes import frame_conditioning as frames_nodes
from sora.nodes import (
    loaders,
    media,
    prompt_expansion,
    sampling,
    text_encode,
    vae_codec,
)

pytestmark = pytest.mark.usefixtures("fresh_manager")  # a memory manager of this module's own

WAN21, WAN22 = "wan2.1_t2v_1.3B_bf16.safetensors", "wan2.2_ti2v_5B_fp16.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"


@pytest.fixture(autouse=True)
def host(models, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models, output_dir=tmp_path / "output")
    return tmp_path / "output"


def load_dit(name=WAN21, **options):
    values = dict(model_name=name, weight_dtype="default", compute_dtype="auto", attention="sdpa",
                  expert=loaders.AUTO_EXPERT) | options
    return loaders.SoraModelLoader().load(**values)[0]


def load_encoder(name=UMT5):
    return loaders.SoraTextEncoderLoader().load(name, "default", "auto")[0]


def load_vae(name="wan_2.1_vae.safetensors"):
    return loaders.SoraVAELoader().load(name, "auto")[0]


def encode(prompt="a red ball rolling right", encoder=None):
    return text_encode.SoraTextEncode().encode(encoder or load_encoder(), prompt, "wan default", "")


def empty(model, width=64, height=32, frames=9):
    return sampling.SoraEmptyLatentVideo().generate(model, width, height, frames, 1)[0]


def sigmas(model, steps=3):
    return sampling.SoraScheduler().schedule(model, steps, 0.0, "wan_unipc", 1.0)[0]


def sample(model, latent, seed=1, positive=None, negative=None, steps=3, **extra):
    if positive is None:
        positive, negative = encode()
    return sampling.SoraSampler().sample(model, positive, negative, latent, sigmas(model, steps), seed, 5.0, "unipc",
                                         1.0, **extra)[0]


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------

def test_dropdowns_list_the_model_folders_with_the_embedded_models_first():
    assert loaders.SoraModelLoader.INPUT_TYPES()["required"]["model_name"][0] == [
        loaders.NANO, "wan2.1-t2v-14b-Q4_K_M.gguf", "wan2.1-t2v-14b-Q8_0.gguf",
        "wan2.1_flf2v_720p_14B_fp16.safetensors", "wan2.1_i2v_480p_14B_fp16.safetensors", WAN21,
        "wan2.1_t2v_14B_bf16.safetensors", "wan2.1_vace_1.3B_fp16.safetensors",
        "wan2.2_i2v_high_noise_14B_fp16.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors",
        WAN22]  # GGUF files too
    assert loaders.SoraTextEncoderLoader.INPUT_TYPES()["required"]["text_encoder_name"][0] == [
        loaders.MINILM, "umt5-xxl-encoder-Q8_0.gguf", UMT5]
    assert loaders.SoraVAELoader.INPUT_TYPES()["required"]["vae_name"][0] == [
        loaders.NANO, "wan2.2_vae.safetensors", "wan_2.1_vae.safetensors"]


def test_the_same_file_and_options_give_the_same_model_object():
    first, again = load_dit(), load_dit()
    assert first.model is again.model
    fp8 = load_dit(weight_dtype="fp8_e4m3fn")
    assert fp8.model is not first.model
    assert fp8.model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    assert first.model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16  # as stored in the file
    assert load_encoder() is load_encoder() and load_vae() is load_vae()


def test_expert_comes_from_the_file_name_or_the_option(tmp_path, models):
    high = tmp_path / "wan2.2_t2v_high_noise_14B_fp16.safetensors"
    low = tmp_path / "low_noise_model" / "diffusion_pytorch_model.safetensors"
    low.parent.mkdir()
    for path in (high, low):
        shutil.copy(models / "diffusion_models" / WAN21, path)
    assert load_dit(path=str(high)).expert == HIGH_NOISE
    assert load_dit(path=str(low)).expert == LOW_NOISE
    assert load_dit().expert == SINGLE
    renamed = load_dit(expert=HIGH_NOISE)
    assert renamed.expert == HIGH_NOISE and renamed.task == "wan22_t2v_a14b"
    steps = 6
    assert torch.equal(sigmas(renamed, steps), schedules.flow_sigmas(steps, 12.0))  # A14B T2V reference shift
    with pytest.raises(InputError, match=r"^Sora Load Diffusion Model: input 'expert' = 'high noise', but "
                                         r"wan2.2_ti2v_5B_fp16.safetensors is a ti2v model"):
        load_dit(WAN22, expert=HIGH_NOISE)


def test_loader_errors_name_the_input(tmp_path, models):
    with pytest.raises(InputError, match=r"^Sora Load Diffusion Model: input 'model_name': diffusion_models model "
                                         r"'missing.safetensors' not found"):
        load_dit("missing.safetensors")
    with pytest.raises(InputError, match=r"^Sora Load VAE: input 'path': .*no such file"):
        loaders.SoraVAELoader().load("wan_2.1_vae.safetensors", "auto", path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(CheckpointError, match=r"^Sora Load Diffusion Model: input 'path': .*not a Wan DiT: it looks "
                                              r"like a Wan video VAE"):
        load_dit(path=str(models / "vae" / "wan_2.1_vae.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Text encode and the scheduler
# ---------------------------------------------------------------------------------------------------------------

def test_text_encode_gives_cores_conditioning_structure_and_the_reference_negative():
    encoder = load_encoder()
    positive, negative = encode("a red ball rolling right", encoder)
    for cond in (positive, negative):
        assert isinstance(cond, list) and len(cond) == 1
        emb, extra = cond[0]
        assert emb.shape == (1, 512, 32) and extra["attention_mask"].shape == (1, 512)
        length = int(extra["attention_mask"].sum())
        assert emb[0, length:].abs().sum() == 0 and emb[0, :length].abs().sum() > 0
    direct, lengths = encoder.encode(["a red ball rolling right", text.DEFAULT_NEGATIVE_PROMPT])
    assert torch.equal(positive[0][0][0, :lengths[0]], direct[0, :lengths[0]])
    assert torch.equal(negative[0][0][0, :lengths[1]], direct[1, :lengths[1]])
    _, more = text_encode.SoraTextEncode().encode(encoder, "x", "none", "blurry")
    assert torch.equal(more[0][0][0], encoder.encode(["blurry"])[0][0])


def test_scheduler_uses_the_models_reference_shift():
    model = load_dit()
    steps = 4
    grid = sigmas(model, steps)
    # Wan 2.1 T2V: shift 5 on linspace(0.999, 0, 5): σ0 = 5·0.999 / (1 + 4·0.999), σ1 = 5·0.74925 / (1 + 4·0.74925)
    assert grid[0].item() == pytest.approx(4.995 / 4.996, abs=1e-7)
    assert grid[1].item() == pytest.approx(3.74625 / 3.997, abs=1e-7)
    assert grid[-1] == 0 and len(grid) == steps + 1
    explicit = sampling.SoraScheduler().schedule(model, steps, 3.0, "wan_unipc", 1.0)[0]
    assert torch.equal(explicit, schedules.flow_sigmas(steps, 3.0))


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------

def test_same_seed_same_video_and_different_seeds_differ():
    model = load_dit()
    a, b, c = sample(model, empty(model), seed=7), sample(model, empty(model), seed=7), sample(model, empty(model), 8)
    assert torch.equal(a["samples"], b["samples"]) and not torch.allclose(a["samples"], c["samples"])
    assert a["samples"].shape == (1, 16, 3, 4, 8)


def test_a_core_style_conditioning_without_mask_drives_the_sampler_the_same():
    """ComfyUI core's umT5 encode gives [1, L, D] rows of the prompt without an attention_mask."""
    model = load_dit()
    positive, negative = encode()
    core = [[[c[0][0][:, :int(c[0][1]["attention_mask"].sum())], {}]] for c in (positive, negative)]
    ours = sample(model, empty(model), positive=positive, negative=negative)
    theirs = sample(model, empty(model), positive=core[0], negative=core[1])
    assert torch.allclose(ours["samples"], theirs["samples"], atol=1e-5)


def test_image_to_video_keeps_the_image_and_decodes_to_the_asked_frames():
    model, vae = load_dit(WAN22), load_vae("wan2.2_vae.safetensors")
    image = media.SoraLoadImage().load("sora_start_frame.png", 64, 32)[0]
    start = vae_codec.SoraVAEEncode().encode(vae, image, "auto", 512, 64)[0]
    condition = frames_nodes.SoraImageToVideo().condition(start, 9)[0]
    assert condition["noise_mask"][:, :, 0].sum() == 0 and condition["noise_mask"][:, :, 1:].min() == 1
    out = sample(model, condition)
    assert torch.equal(out["samples"][:, :, :1], start["samples"])
    video = vae_codec.SoraVAEDecode().decode(vae, out, "auto", 512, 64)[0]
    assert video.shape == (9, 32, 64, 3)


def test_extend_forward_twice_and_join():
    model = load_dit(WAN22)
    clip = sample(model, empty(model, frames=9), seed=1)
    part_1 = sample(model, frames_nodes.SoraExtendForward().extend(clip, 4, 8)[0], seed=2)
    part_2 = sample(model, frames_nodes.SoraExtendForward().extend(part_1, 4, 8)[0], seed=3)
    assert torch.equal(part_1["samples"][:, :, :1], clip["samples"][:, :, -1:])  # the overlap is kept exactly
    joined = frames_nodes.SoraJoinClips().join(clip, part_1, 4, False, part_3=part_2)[0]["samples"]
    assert joined.shape[2] == 3 + 2 + 2
    assert torch.equal(joined[:, :, 3:5], part_1["samples"][:, :, 1:])


def test_sampler_errors_name_the_input():
    model = load_dit()
    minilm_like = [[torch.randn(1, 7, 384), {"attention_mask": torch.ones(1, 7, dtype=torch.long)}]]
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'positive' = CONDITIONING of width 384 does not "
                                         rf"fit {WAN21}, which reads 32-wide text states"):
        sample(model, empty(model), positive=minilm_like, negative=minilm_like)
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'latent' = LATENT \[1, 48, 3, 2, 4\] has 48 "
                                         r"channels but .* works on 16"):
        sample(model, empty(load_dit(WAN22)))
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'negative': CONDITIONING must be a non-empty list"):
        sample(model, empty(model), positive=encode()[0], negative=[])
    i2v = dataclasses.replace(model, model=type("Dit", (), {"config": dataclasses.replace(model.config, in_dim=36,
                                                                                            model_type="i2v")})())
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'model' = .* is a Wan image-to-video model \(36 "):
        sample(i2v, empty(model))


def test_two_experts_hand_off_and_refuse_swapped_roles(tmp_path, models):
    high_path = tmp_path / "wan2.2_t2v_high_noise_14B_fp16.safetensors"
    low_path = tmp_path / "wan2.2_t2v_low_noise_14B_fp16.safetensors"
    shutil.copy(models / "diffusion_models" / WAN21, high_path)
    # the low-noise expert: the same shapes with other random weights
    from safetensors.torch import save_file
    save_file(standins._dit(standins.WAN21_DIT_STANDIN, torch.bfloat16, 99)(), str(low_path))
    high, low = load_dit(path=str(high_path)), load_dit(path=str(low_path))
    alone = sample(high, empty(high), steps=4)["samples"]
    both = sample(high, empty(high), steps=4, model_low_noise=low, boundary=0.9)["samples"]
    only_low = sample(high, empty(high), steps=4, model_low_noise=low, boundary=1.0)["samples"]
    assert not torch.allclose(alone, both) and not torch.allclose(both, only_low)
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'model_low_noise' = '.*high_noise.*' is the high "
                                         r"noise expert while 'model' is the low noise one"):
        sample(low, empty(low), model_low_noise=high)


def test_progress_previews_and_cancel(monkeypatch):
    model = load_dit()
    updates = []

    class Recorder:
        def __init__(self, total, desc=""):
            self.total = total

        def update(self, n=1, preview=None):
            updates.append((self.total, n, preview))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(runtime, "progress", Recorder)
    monkeypatch.setattr(runtime, "wants_previews", lambda: True)
    sample(model, empty(model, width=64, height=32), steps=3)
    assert [(total, n) for total, n, _ in updates] == [(3, 1)] * 3
    assert all(isinstance(p, Image.Image) and p.size == (8, 4) for _, _, p in updates)  # one pixel per latent cell
    runtime.request_interrupt()
    with pytest.raises(Interrupted):
        sample(model, empty(model))


# ---------------------------------------------------------------------------------------------------------------
# VAE encode and decode
# ---------------------------------------------------------------------------------------------------------------

def test_vae_nodes_convert_between_image_frames_and_latents():
    vae = load_vae()
    frames = torch.rand(5, 32, 48, 3)
    latent = vae_codec.SoraVAEEncode().encode(vae, frames, "auto", 512, 64)[0]
    video = frames.permute(3, 0, 1, 2)[None] * 2 - 1
    assert torch.equal(latent["samples"], vae.encode(video))
    decoded = vae_codec.SoraVAEDecode().decode(vae, latent, "auto", 512, 64)[0]
    expected = (vae.decode(latent["samples"])[0].permute(1, 2, 3, 0) + 1) / 2
    assert decoded.shape == (5, 32, 48, 3) and torch.equal(decoded, expected)
    whole = vae_codec.SoraVAEDecode().decode(vae, latent, "off", 512, 64)[0]
    assert torch.equal(whole, expected)


def test_manual_tiling_is_close_to_whole_frames_and_batches_concatenate():
    vae = load_vae()
    latent = {"samples": torch.randn(2, 16, 2, 8, 12)}
    whole = vae_codec.SoraVAEDecode().decode(vae, latent, "off", 512, 64)[0]
    tiled = vae_codec.SoraVAEDecode().decode(vae, latent, "manual", 64, 32)[0]
    assert whole.shape == tiled.shape == (2 * 5, 64, 96, 3)
    assert (whole - tiled).abs().mean() < 0.05
    with pytest.raises(InputError, match=r"^Sora VAE Decode: input 'tile_overlap' = 64 must be smaller than "
                                         r"tile_size \(64\)"):
        vae_codec.SoraVAEDecode().decode(vae, latent, "manual", 64, 64)


def test_vae_encode_names_frames_off_the_grid():
    with pytest.raises(InputError, match=r"^Sora VAE Encode: input 'image': 6 frames do not fit the VAE's causal "
                                         r"grid of 1 \+ 4k frames; use 5 or 9"):
        vae_codec.SoraVAEEncode().encode(load_vae(), torch.rand(6, 32, 48, 3), "auto", 512, 64)
    with pytest.raises(InputError, match=r"^Sora VAE Encode: input 'image': video height 30 is not a multiple of 8"):
        vae_codec.SoraVAEEncode().encode(load_vae(), torch.rand(5, 30, 48, 3), "auto", 512, 64)


# ---------------------------------------------------------------------------------------------------------------
# Prompt expansion
# ---------------------------------------------------------------------------------------------------------------

def expand(prompt="a crimson ball rolling right", preset="nano", model=prompt_expansion.EMBEDDED, seed=0,
           creativity=0.7, max_length=800):
    return prompt_expansion.SoraPromptExpansion().expand(prompt, preset, model, seed, creativity, max_length)


def test_nano_expansion_is_shown_and_returned_and_repeatable():
    result = expand()
    caption = result["result"][0]
    assert result["ui"] == {"text": [caption]}
    assert "red" in caption and "right" in caption
    assert expand()["result"] == (caption,)
    with pytest.raises(InputError, match=r"^Sora Prompt Expansion: input 'prompt' = '  ' is empty"):
        expand("  ")


@pytest.fixture(scope="module")
def tiny_chat(models):
    """A tiny random Qwen2 chat model (byte-level BPE tokenizer with a ChatML template) in models/LLM."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(token_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["a cat surfing a wave at sunset, golden light, slow camera pan"] * 4,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    folder = models / "LLM" / "tiny-chat"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=template).save_pretrained(folder)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=False))
    with torch.no_grad():  # clear-cut random choices, chat markers never chosen: replies run to the limit
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[[backend.token_to_id(t) for t in specials]] = 0.0
    model.save_pretrained(folder)
    return "tiny-chat"


def test_wan_expansion_with_a_chat_model_from_the_llm_folder(tiny_chat):
    choices = prompt_expansion.SoraPromptExpansion.INPUT_TYPES()["required"]["model"][0]
    assert choices == [prompt_expansion.EMBEDDED, tiny_chat]
    first = expand("a cat surfing", "wan", tiny_chat, seed=3, max_length=60)["result"][0]
    assert first == expand("a cat surfing", "wan", tiny_chat, seed=3, max_length=60)["result"][0]
    assert first != expand("a cat surfing", "wan", tiny_chat, seed=4, max_length=60)["result"][0]
    assert 0 < len(first) <= 60
    cached = model_cache.load(prompt_expansion.sora.prompt_expansion.ChatModel,
                              runtime.model_folders("LLM")[0] / tiny_chat, device=torch.device("cpu"))
    assert not cached.is_loaded  # released after use


def test_missing_chat_model_is_named():
    with pytest.raises(InputError, match=r"^Sora Prompt Expansion: input 'model' = 'gone' is not in LLM or "
                                         r"text_encoders; put a chat model folder"):
        expand("a cat surfing", "wan", "gone")


# ---------------------------------------------------------------------------------------------------------------
# Memory options
# ---------------------------------------------------------------------------------------------------------------

def test_memory_options_stream_blocks_without_changing_the_result():
    from sora.nodes.memory_options import SoraMemoryOptions
    model = load_dit()
    (streamed,) = SoraMemoryOptions().apply(model, 0.5, 0)
    assert (streamed.memory.blocks_resident, streamed.memory.budget_bytes) == (0, 2**29)
    assert model.memory == MemorySettings() and streamed.model is model.model  # the input handle is kept
    manager = memory.get_manager()
    automatic = sample(model, empty(model))["samples"]
    assert manager.state(model.model).blocks_resident == model.config.num_layers
    with_options = sample(streamed, empty(model))["samples"]
    assert manager.state(model.model).blocks_resident == 0  # every block streamed during the run
    assert manager.options.budget_bytes is None  # the budget applied to that run only
    assert torch.equal(automatic, with_options)
    sample(model, empty(model))  # the same cached model through a handle without options: automatic again
    assert manager.state(model.model).blocks_resident == model.config.num_layers
    with pytest.raises(InputError, match=r"^Sora Memory Options: input 'blocks_resident' = 3 is more than the 2 "
                                         r"blocks of wan2.1_t2v_1.3B_bf16.safetensors"):
        SoraMemoryOptions().apply(model, 0.0, 3)


# ---------------------------------------------------------------------------------------------------------------
# The embedded defaults, on stand-in nano files (the shipped weights are exercised by test_workflows)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_nano(tmp_path, monkeypatch):
    """Tiny random files in the nano layout (`sora.family` metadata, latent statistics in the VAE's metadata),
    served by sora.nano's path helpers, with the "nano" latent format they describe."""
    from safetensors.torch import save_file

    from sora import latent_formats, nano
    from sora.dit import DiTConfig, WanDiT
    from sora.vae import VAEConfig, WanVAE

    fmt = latent_formats.LatentFormat(name="nano", channels=4, spatial=8, temporal=4, mean=(0.1,) * 4, std=(0.5,) * 4,
                                      rgb_factors=((0.3, 0.1, 0.0),) * 4, rgb_bias=(0.0, 0.0, 0.0))
    config = DiTConfig(in_dim=4, out_dim=4, dim=64, ffn_dim=64, num_heads=2, num_layers=1, text_dim=384,
                       freq_dim=32, latent_format="nano", per_token_timesteps=True)
    dit_file, vae_file = tmp_path / "nano_dit.safetensors", tmp_path / "nano_vae.safetensors"
    save_file(standins._seeded(7, lambda: WanDiT(config)).state_dict(), str(dit_file),
              metadata={"sora.family": "nano", "sora.num_heads": "2"})
    save_file(standins._seeded(8, lambda: WanVAE(VAEConfig.tiny(z_dim=4))).state_dict(), str(vae_file),
              metadata=nano.latent_format_metadata(fmt))
    monkeypatch.setattr(nano, "dit_path", lambda: dit_file)
    monkeypatch.setattr(nano, "vae_path", lambda: vae_file)
    monkeypatch.setitem(latent_formats.FORMATS, "nano", fmt)
    return fmt


def test_the_embedded_models_are_the_defaults_and_need_no_file(fake_nano, host):
    from sora import nano
    defaults = {name: spec[1]["default"] for loader in (loaders.SoraModelLoader, loaders.SoraTextEncoderLoader,
                                                        loaders.SoraVAELoader)
                for name, spec in loader.INPUT_TYPES()["required"].items() if name.endswith("_name")}
    assert defaults == {"model_name": loaders.NANO, "text_encoder_name": loaders.MINILM, "vae_name": loaders.NANO}
    model, encoder, vae = load_dit(loaders.NANO), load_encoder(loaders.MINILM), load_vae(loaders.NANO)
    assert model.name == loaders.NANO and model.task == "nano" and encoder.name == "minilm-l6"
    assert torch.equal(sigmas(model, 4), schedules.flow_sigmas(4, nano.DEFAULTS.shift))  # the nano default shift
    encoded = text_encode.SoraTextEncode().encode(encoder, "a red circle moving right", "none", "")
    assert encoded["ui"]["text"] == ["encoded: a red circle moving to the right"]  # nano's caption style
    positive, negative = encoded["result"]
    latent = sampling.SoraEmptyLatentVideo().generate(model, 32, 32, 9, 1)[0]
    assert latent["samples"].shape == (1, fake_nano.channels, 3, 4, 4)
    out = sample(model, latent, positive=positive, negative=negative)
    frames = vae_codec.SoraVAEDecode().decode(vae, out, "auto", 512, 64)[0]
    assert frames.shape == (9, 32, 32, 3)
