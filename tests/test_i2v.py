"""Wan 2.2 I2V-A14B end to end through the nodes, on the tiny stand-ins: Sora Wan Image To Video builds the
condition of ARCH_FACTS §4.7 in core's CONDITIONING form (`concat_latent_image`, `concat_mask`), a condition made
the way core's WanImageToVideo makes it drives our sampler exactly like ours, both experts see 36 channels on every
call, and wrong wiring gets errors that name the node and the input."""
import numpy as np
import pytest
import torch
from PIL import Image

from sora import conditioning, dit, handle, runtime, standins
from sora.errors import InputError
from sora.latent_formats import WAN21
from sora.nodes import frame_conditioning, loaders, sampling, text_encode

pytestmark = pytest.mark.usefixtures("fresh_manager")  # a memory manager of this module's own

HIGH, LOW = "wan2.2_i2v_high_noise_14B_fp16.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors"
T2V = "wan2.1_t2v_1.3B_bf16.safetensors"
WIDTH, HEIGHT, FRAMES = 64, 32, 9  # 3 latent frames of 4 x 8 cells


@pytest.fixture(autouse=True)
def host(models, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models)


def load_dit(name):
    return loaders.SoraModelLoader().load(name, "default", "auto", "sdpa", loaders.AUTO_EXPERT)[0]


def load_vae():
    return loaders.SoraVAELoader().load("wan_2.1_vae.safetensors", "auto")[0]


def encode_text():
    encoder = loaders.SoraTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "default", "auto")[0]
    return text_encode.SoraTextEncode().encode(encoder, "a red ball rolling right", "wan default", "")


def image(seed, height=HEIGHT, width=WIDTH, frames=1):
    """IMAGE [frames, H, W, 3] in 0..1."""
    return torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(seed))


def wan_i2v(start, end=None, frames=FRAMES, width=WIDTH, height=HEIGHT, batch=1):
    positive, negative = encode_text()
    return frame_conditioning.SoraWanImageToVideo().condition(positive, negative, load_vae(), start, width, height,
                                                              frames, batch, end_image=end)


def run_sampler(model, positive, negative, latent, low=None, steps=4, seed=3):
    sigmas = sampling.SoraScheduler().schedule(model, steps, 0.0, "wan_unipc", 1.0)[0]
    extra = {} if low is None else {"model_low_noise": low, "boundary": 0.9, "guidance_low_noise": 3.5}
    return sampling.SoraSampler().sample(model, positive, negative, latent, sigmas, seed, 3.5, "unipc", 1.0,
                                         **extra)[0]["samples"]


def reference_mask(known, latent_frames):
    """ARCH_FACTS §4.7 by hand, the reference's sense (1 = known), [4, T]: latent frame 0 is pixel frame 0 in all
    four channels; channel k of latent frame j is pixel frame 4j + k - 3."""
    mask = torch.zeros(4, latent_frames)
    for j in range(latent_frames):
        for k in range(4):
            mask[k, j] = float((0 if j == 0 else 4 * j + k - 3) in known)
    return mask


def encode_video(pixels):
    """The stand-in VAE's raw latent of IMAGE frames [F, H, W, 3] in 0..1, straight through the VAE."""
    return load_vae().encode(pixels.permute(3, 0, 1, 2)[None] * 2.0 - 1.0)


def extras(cond):
    return cond[0][1]


# ---------------------------------------------------------------------------------------------------------------
# The condition the node builds
# ---------------------------------------------------------------------------------------------------------------

def test_the_node_builds_the_reference_condition():
    start = image(1)
    positive, negative, latent = wan_i2v(start)
    # conditioning video by hand: the image at frame 0, mid-gray (0.5 in 0..1, 0 in -1..1) on the other 8
    video = torch.full((FRAMES, HEIGHT, WIDTH, 3), 0.5)
    video[0] = start[0]
    expected_latent = encode_video(video)
    for cond in (positive, negative):
        torch.testing.assert_close(extras(cond)["concat_latent_image"], expected_latent, rtol=1e-5, atol=1e-5)
    mask = extras(positive)["concat_mask"]
    assert mask.shape == (1, 4, 3, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(1.0 - mask, reference_mask({0}, 3)[None, :, :, None, None].expand_as(mask))
    assert latent["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and not latent["samples"].any()
    # what the model receives: the reference mask, then the normalised latent (§1.2 step 1)
    channels = conditioning.wan_i2v_concat(extras(positive)["concat_latent_image"], mask, WAN21)
    torch.testing.assert_close(channels[:, 4:], WAN21.normalize(expected_latent), rtol=1e-5, atol=1e-5)
    assert torch.equal(channels[0, :4, :, 0, 0], reference_mask({0}, 3))


def test_first_last_frame_marks_the_last_slot_like_core():
    start, end = image(1), image(2)
    positive = wan_i2v(start, end)[0]
    video = torch.full((FRAMES, HEIGHT, WIDTH, 3), 0.5)
    video[0], video[-1] = start[0], end[0]
    torch.testing.assert_close(extras(positive)["concat_latent_image"], encode_video(video), rtol=1e-5, atol=1e-5)
    mask = extras(positive)["concat_mask"]
    assert torch.equal(1.0 - mask[0, :, :, 0, 0], reference_mask({0, FRAMES - 1}, 3))
    assert (1.0 - mask[0, :, -1, 0, 0]).tolist() == [0, 0, 0, 1]  # §4.7: FLF2V's last latent frame
    # core's WanFirstLastFrameToVideo: 4T pixel slots, 0 on the first 4 (frame 0 repeated) and the last, viewed
    # [T, 4] and transposed to [4, T]
    slots = torch.ones(4 * 3)
    slots[:4], slots[-1] = 0.0, 0.0
    assert torch.equal(mask[0, :, :, 0, 0], slots.view(3, 4).T)


def test_the_image_is_centre_cropped_to_the_aspect_and_resized():
    tall = image(3, height=48, width=64)  # 4:3 into 2:1: rows 8..40 are kept, no resize needed
    video, known = conditioning.wan_i2v_video(FRAMES, HEIGHT, WIDTH, tall.permute(3, 0, 1, 2)[None] * 2 - 1)
    assert known == [0]
    assert torch.equal(video[0, :, 0], tall[0, 8:40].permute(2, 0, 1) * 2 - 1)
    assert not video[:, :, 1:].any()
    # twice the size: bilinear with antialiasing, as PIL resizes float images
    big = image(4, height=2 * HEIGHT, width=2 * WIDTH)
    video, _ = conditioning.wan_i2v_video(FRAMES, HEIGHT, WIDTH, big.permute(3, 0, 1, 2)[None])
    pil = [torch.from_numpy(np.array(Image.fromarray(big[0, :, :, c].numpy(), mode="F").resize(
        (WIDTH, HEIGHT), Image.BILINEAR))) for c in range(3)]
    torch.testing.assert_close(video[0, :, 0], torch.stack(pil), rtol=0, atol=1e-5)


def test_the_node_leaves_its_inputs_unchanged():
    positive, negative = encode_text()
    before = [dict(extra) for _, extra in positive]
    out = frame_conditioning.SoraWanImageToVideo().condition(positive, negative, load_vae(), image(1), WIDTH,
                                                             HEIGHT, FRAMES, 1)
    assert [dict(extra) for _, extra in positive] == before and "concat_mask" not in negative[0][1]
    assert out[0][0][0] is positive[0][0]  # the text embedding travels on as it is


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------

def core_condition(cond, start, frames=FRAMES):
    """What core's WanImageToVideo adds for one start image: the raw latent of [image, 0.5 gray ...] and a
    one-channel mask per latent frame, 0 on the image's latent frame (conditioning_set_values: new dicts)."""
    video = torch.ones(frames, HEIGHT, WIDTH, 3) * 0.5
    video[:start.shape[0]] = start
    latent = encode_video(video)
    mask = torch.ones(1, 1, latent.shape[2], latent.shape[-2], latent.shape[-1])
    mask[:, :, :(start.shape[0] - 1) // 4 + 1] = 0.0
    return [[emb, {**extra, "concat_latent_image": latent, "concat_mask": mask}] for emb, extra in cond]


def test_core_style_condition_drives_the_sampler_like_ours():
    high, low = load_dit(HIGH), load_dit(LOW)
    start = image(5)
    ours_positive, ours_negative, latent = wan_i2v(start)
    text_positive, text_negative = encode_text()
    core_positive, core_negative = core_condition(text_positive, start), core_condition(text_negative, start)
    ours = run_sampler(high, ours_positive, ours_negative, latent, low)
    core = run_sampler(high, core_positive, core_negative, {"samples": torch.zeros_like(latent["samples"])}, low)
    torch.testing.assert_close(ours, core, rtol=1e-6, atol=1e-6)
    assert ours.abs().sum() > 0
    # the image matters: another start image gives another video
    other = wan_i2v(image(6))
    assert not torch.allclose(run_sampler(high, other[0], other[1], other[2], low), ours)


def test_both_experts_get_the_same_36_channels_on_every_call():
    high, low = load_dit(HIGH), load_dit(LOW)
    positive, negative, latent = wan_i2v(image(7))
    expected = torch.cat([reference_mask({0}, 3)[None, :, :, None, None].expand(1, 4, 3, 4, 8),
                          WAN21.normalize(extras(positive)["concat_latent_image"])], dim=1)
    calls = []
    hooks = [expert.model.register_forward_pre_hook(lambda module, args, who=who: calls.append((who, args[0])))
             for who, expert in (("high", high), ("low", low))]
    try:
        out = run_sampler(high, positive, negative, latent, low, steps=4)
    finally:
        for hook in hooks:
            hook.remove()
    # shift 5, 4 steps: σ = 0.9998, 0.937 (high noise, ≥ 0.9), then 0.833, 0.625 (low noise)
    assert [who for who, _ in calls] == ["high", "high", "low", "low"]
    for _, x in calls:  # [cond; uncond], 16 latent channels then the same 20 image channels
        assert x.shape == (2, 36, 3, 4, 8)
        torch.testing.assert_close(x[:, 16:], expected.expand(2, -1, -1, -1, -1), rtol=1e-6, atol=1e-6)
    assert out.shape == latent["samples"].shape


def test_a_batch_shares_one_image_condition():
    high = load_dit(HIGH)
    positive, negative, latent = wan_i2v(image(8), batch=2)
    assert latent["samples"].shape[0] == 2 and extras(positive)["concat_latent_image"].shape[0] == 1
    out = run_sampler(high, positive, negative, latent, steps=2)
    assert out.shape[0] == 2 and not torch.allclose(out[0], out[1])  # each video has its own noise


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

def test_an_i2v_model_without_an_image_condition_is_refused():
    high = load_dit(HIGH)
    positive, negative = encode_text()
    latent = {"samples": torch.zeros(1, 16, 3, 4, 8)}
    with pytest.raises(InputError, match=rf"^Sora Sampler: input 'model' = '{HIGH}' is a Wan image-to-video model "
                                         r"\(36 input channels: the latent and 20 of the start image\), but "
                                         r"'positive' carries no image condition; run positive and negative "
                                         r"through Sora Wan Image To Video"):
        run_sampler(high, positive, negative, latent)


def test_a_t2v_model_with_an_image_condition_is_refused():
    positive, negative, latent = wan_i2v(image(1))
    with pytest.raises(InputError, match=rf"^Sora Sampler: input 'positive' = CONDITIONING with an image condition "
                                         rf"\(concat_latent_image\), but {T2V} takes no image channels"):
        run_sampler(load_dit(T2V), positive, negative, latent)


def test_a_latent_of_another_size_than_the_condition_is_refused():
    positive, negative, _ = wan_i2v(image(1))
    other = {"samples": torch.zeros(1, 16, 5, 4, 8)}
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'latent' = LATENT \[1, 16, 5, 4, 8\] does not match "
                                         r"the image condition in 'positive' \(its latent is \[1, 16, 3, 4, 8\]\)"):
        run_sampler(load_dit(HIGH), positive, negative, other)


def test_a_condition_without_its_mask_is_refused():
    positive, negative, latent = wan_i2v(image(1))
    fun_like = [[emb, {k: v for k, v in extra.items() if k != "concat_mask"}] for emb, extra in positive]
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'positive': the CONDITIONING carries a "
                                         r"concat_latent_image without a leading concat_mask"):
        run_sampler(load_dit(HIGH), fun_like, negative, latent)
    short = [[emb, {**extra, "concat_mask": extra["concat_mask"][:, :, :2]}] for emb, extra in positive]
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'positive': concat_mask \(1, 4, 2, 4, 8\) does not "
                                         r"fit concat_latent_image \(1, 16, 3, 4, 8\)"):
        run_sampler(load_dit(HIGH), short, negative, latent)


@pytest.mark.parametrize("change, message", [
    ({"width": 72}, r"input 'width' = 72 is not a multiple of 16 \(8x VAE compression, 2x2 patches\); use 64 or 80"),
    ({"frames": 10}, r"input 'frames' = 10 is not 1\+4k"),
    ({"start": image(1, frames=9)}, r"input 'frames': 9 start and 0 end frame\(s\) leave nothing to generate"),
    ({"start": torch.rand(32, 64, 3)}, r"input 'start_image': start_image must be IMAGE frames"),
])
def test_node_errors_name_the_input(change, message):
    values = {"start": image(1)} | change
    with pytest.raises(InputError, match=r"^Sora Wan Image To Video: " + message):
        wan_i2v(**values)


# ---------------------------------------------------------------------------------------------------------------
# The stand-in experts
# ---------------------------------------------------------------------------------------------------------------

def test_the_i2v_standins_load_as_the_two_a14b_experts(models):
    high, low = load_dit(HIGH), load_dit(LOW)
    assert (high.expert, low.expert) == (handle.HIGH_NOISE, handle.LOW_NOISE)
    for expert in (high, low):
        config = expert.config
        assert (config.model_type, config.in_dim, config.out_dim, config.head_dim) == ("i2v", 36, 16, 128)
        assert expert.task == "wan22_i2v_a14b"
    assert not torch.equal(high.model.patch_embedding.weight, low.model.patch_embedding.weight)
    from safetensors import safe_open
    with safe_open(str(models / "diffusion_models" / HIGH), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.diffusion_model.patch_embedding.weight").get_shape() == [128, 36, 1, 2, 2]
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    t2v = set(dit.WanDiT(standins.WAN21_DIT_STANDIN).state_dict())
    assert {k.removeprefix("model.diffusion_model.") for k in keys} == t2v  # §1.1: the T2V key set
    defaults = high.defaults()
    assert (defaults.shift, defaults.guidance, defaults.low_noise_guidance, defaults.boundary_t) == (5.0, 3.5, 3.5,
                                                                                                      900.0)


def test_core_one_channel_masks_read_like_four_channel_ones():
    # core's WanImageToVideo writes one channel per latent frame; broadcast over H and W works too
    latent = torch.randn(1, 16, 3, 4, 8, generator=torch.Generator().manual_seed(9))
    one = torch.ones(1, 1, 3, 1, 1)
    one[:, :, 0] = 0.0
    four = conditioning.wan_i2v_mask([0], 3, 4, 8)
    torch.testing.assert_close(conditioning.wan_i2v_concat(latent, one, WAN21),
                               conditioning.wan_i2v_concat(latent, four, WAN21), rtol=0, atol=0)
    with pytest.raises(InputError, match="concat_latent_image has 48 channels"):
        conditioning.wan_i2v_concat(torch.zeros(1, 48, 3, 4, 8), four, WAN21)
