"""Wan 2.1 I2V-14B and FLF2V-14B through the nodes: CLIP vision load and encode, the image tokens in the
conditioning (core's structure), and the sampler handing them to the model's image branch."""
import logging

import pytest
import torch

from sora import clip_vision, handle, runtime
from sora.errors import InputError
from sora.nodes import clip_vision as clip_nodes
from sora.nodes import frame_conditioning, loaders, sampling, text_encode

pytestmark = pytest.mark.usefixtures("fresh_manager")  # a memory manager of this module's own

I2V, FLF2V = "wan2.1_i2v_480p_14B_fp16.safetensors", "wan2.1_flf2v_720p_14B_fp16.safetensors"
A14B_HIGH = "wan2.2_i2v_high_noise_14B_fp16.safetensors"
CLIP = "clip_vision_h.safetensors"
WIDTH, HEIGHT, FRAMES = 64, 32, 9


@pytest.fixture(autouse=True)
def host(models, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models)


def load_dit(name):
    return loaders.SoraModelLoader().load(name, "default", "auto", "sdpa", loaders.AUTO_EXPERT)[0]


def load_clip():
    return clip_nodes.SoraCLIPVisionLoader().load(CLIP, "auto")[0]


def image(seed, height=HEIGHT, width=WIDTH):
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))


def encode_image(img, crop="none"):
    return clip_nodes.SoraCLIPVisionEncode().encode(load_clip(), img, crop)[0]


def condition(start, end=None, start_tokens=None, end_tokens=None):
    encoder = loaders.SoraTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "default", "auto")[0]
    positive, negative = text_encode.SoraTextEncode().encode(encoder, "a red ball rolling right", "wan i2v", "")
    vae = loaders.SoraVAELoader().load("wan_2.1_vae.safetensors", "auto")[0]
    return frame_conditioning.SoraWanImageToVideo().condition(
        positive, negative, vae, start, WIDTH, HEIGHT, FRAMES, 1, end_image=end, clip_vision_start_image=start_tokens,
        clip_vision_end_image=end_tokens)


def sample(model, positive, negative, latent, steps=2):
    sigmas = sampling.SoraScheduler().schedule(model, steps, 0.0, "wan_unipc", 1.0)[0]
    return sampling.SoraSampler().sample(model, positive, negative, latent, sigmas, 3, 5.0, "unipc", 1.0)[0]["samples"]


def test_the_loader_reads_the_clip_file_and_the_encoder_gives_the_penultimate_layer():
    encoder = load_clip()
    assert isinstance(encoder, clip_vision.CLIPVisionEncoder)
    img = image(1)
    out = encode_image(img)
    # by hand: Wan's preprocessing (a straight resize, 8-bit, CLIP mean / std), then all layers but the last
    pixels = clip_vision.preprocess(img, "none", size=encoder.config.image_size)
    expected = encoder(pixels, layer=-2)
    torch.testing.assert_close(out.penultimate_hidden_states, expected.float(), rtol=0, atol=0)
    assert out.penultimate_hidden_states.shape == (1, encoder.config.num_tokens, encoder.config.hidden_size)
    # centre crop sees another part of a wide image
    assert not torch.allclose(encode_image(img, "center").penultimate_hidden_states, out.penultimate_hidden_states)


def test_the_tokens_travel_in_the_conditioning_as_core_keeps_them():
    start = image(2)
    tokens = encode_image(start)
    positive, negative, _ = condition(start, start_tokens=tokens)
    for cond in (positive, negative):
        stored = cond[0][1]["clip_vision_output"]
        assert stored.penultimate_hidden_states is tokens.penultimate_hidden_states
        assert "concat_latent_image" in cond[0][1] and "concat_mask" in cond[0][1]


def test_first_last_frame_joins_the_start_and_end_tokens_in_that_order():
    start, end = image(3), image(4)
    first, last = encode_image(start), encode_image(end)
    positive, _, _ = condition(start, end, first, last)
    joined = positive[0][1]["clip_vision_output"].penultimate_hidden_states
    n = first.penultimate_hidden_states.shape[1]
    assert joined.shape[1] == 2 * n
    torch.testing.assert_close(joined[:, :n], first.penultimate_hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(joined[:, n:], last.penultimate_hidden_states, rtol=0, atol=0)


def test_an_end_image_without_a_start_image_is_refused():
    start = image(3)
    with pytest.raises(InputError, match=r"^Sora Wan Image To Video: input 'clip_vision_end_image' .* without "
                                         r"clip_vision_start_image"):
        condition(start, end_tokens=encode_image(start))


@pytest.mark.parametrize("name", [I2V, FLF2V])
def test_the_sampler_hands_the_tokens_to_the_image_branch(name):
    model = load_dit(name)
    assert model.config.image_dim == clip_vision.CLIP_VISION_TINY.hidden_size
    start, end = image(5), image(6)
    tokens = [encode_image(start)] + ([encode_image(end)] if name == FLF2V else [])
    positive, negative, latent = condition(start, end if name == FLF2V else None, *tokens)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["image"]),
                                                 with_kwargs=True)
    try:
        out = sample(model, positive, negative, latent)
    finally:
        hook.remove()
    expected = positive[0][1]["clip_vision_output"].penultimate_hidden_states
    assert len(seen) == 2  # two steps, cond and uncond batched in each
    for got in seen:  # both guidance passes see the same tokens
        assert got.shape == (2, *expected.shape[1:])
        torch.testing.assert_close(got, expected.expand(2, -1, -1), rtol=0, atol=0)
    # the tokens matter: another CLIP image, the same latent condition, another video
    other = condition(start, end if name == FLF2V else None, encode_image(image(9)), *tokens[1:])
    assert not torch.allclose(sample(model, other[0], other[1], other[2]), out)


def test_a_wan21_i2v_model_without_tokens_is_refused_clearly():
    model = load_dit(I2V)
    positive, negative, latent = condition(image(1))
    with pytest.raises(InputError, match=rf"^Sora Sampler: input 'positive' = CONDITIONING without CLIP image tokens "
                                         rf"but {I2V} is a Wan 2.1 I2V model, which reads the start image through "
                                         r"CLIP vision too; connect Sora CLIP Vision Encode"):
        sample(model, positive, negative, latent)


def test_tokens_for_a_model_without_an_image_branch_are_ignored_with_a_warning(caplog):
    model = load_dit(A14B_HIGH)
    start = image(1)
    with_tokens = condition(start, start_tokens=encode_image(start))
    plain = condition(start)
    with caplog.at_level(logging.WARNING):
        out = sample(model, *with_tokens)
    assert f"{A14B_HIGH} has no CLIP image branch" in caplog.text
    torch.testing.assert_close(out, sample(model, *plain), rtol=0, atol=0)


def test_tokens_of_another_width_are_refused():
    model = load_dit(I2V)
    start = image(1)
    wrong = clip_vision.ClipVisionOutput(torch.zeros(1, 257, 1024))  # a ViT-L/14 output
    positive, negative, latent = condition(start, start_tokens=wrong)
    with pytest.raises(InputError, match=r"input 'positive' = CLIP image tokens \[1, 257, 1024\] are 1024 wide but "
                                         rf"{I2V} reads 32-wide ones"):
        sample(model, positive, negative, latent)


def test_the_wan21_models_get_their_reference_defaults():
    assert load_dit(I2V).task == "wan21_i2v_480p"
    assert load_dit(FLF2V).task == "wan21_flf2v"
    assert handle.ModelHandle(load_dit(I2V).model, "wan2.1_i2v_720p_14B_bf16.safetensors").defaults().shift == 5.0
    assert load_dit(I2V).defaults().shift == 3.0 and load_dit(FLF2V).defaults().shift == 16.0


def test_a_core_clip_vision_model_drives_our_encode_node():
    class CoreClipVision:  # core's ClipVisionModel: encode_image(image, crop=bool) -> Output
        def __init__(self):
            self.calls = []

        def encode_image(self, image, crop=True):
            self.calls.append(crop)
            return clip_vision.ClipVisionOutput(torch.ones(image.shape[0], 257, 1280))

    core = CoreClipVision()
    img = image(1)
    assert clip_nodes.SoraCLIPVisionEncode().encode(core, img, "center")[0].penultimate_hidden_states.shape[1] == 257
    clip_nodes.SoraCLIPVisionEncode().encode(core, img, "none")
    assert core.calls == [True, False]
    with pytest.raises(InputError, match=r"^Sora CLIP Vision Encode: input 'clip_vision' = 'str' is not a CLIP "
                                         r"vision model"):
        clip_nodes.SoraCLIPVisionEncode().encode("clip", img, "none")
