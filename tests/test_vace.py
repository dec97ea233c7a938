"""VACE through the nodes: Sora VACE Encode's channels and masks against the reference construction derived by
hand (ECOSYSTEM_FACTS §6), reference frames in front and never in the output, core's conditioning structure, the
sampler handing the 96-channel contexts to the model, and extension through a frame condition."""
import pytest
import torch

from sora import runtime, vace
from sora.errors import InputError
from sora.latent_formats import WAN21
from sora.nodes import frame_conditioning, loaders, sampling, text_encode
from sora.nodes import vace as vace_nodes

pytestmark = pytest.mark.usefixtures("fresh_manager")  # a memory manager of this module's own

VACE_DIT, T2V = "wan2.1_vace_1.3B_fp16.safetensors", "wan2.1_t2v_1.3B_bf16.safetensors"
WIDTH, HEIGHT, FRAMES = 64, 32, 9  # 3 latent frames of 4 x 8 cells


@pytest.fixture(autouse=True)
def host(models, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models)


def load_dit(name=VACE_DIT):
    return loaders.SoraModelLoader().load(name, "default", "auto", "sdpa", loaders.AUTO_EXPERT)[0]


def load_vae(name="wan_2.1_vae.safetensors"):
    return loaders.SoraVAELoader().load(name, "auto")[0]


def text():
    encoder = loaders.SoraTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "default", "auto")[0]
    return text_encode.SoraTextEncode().encode(encoder, "a red ball rolling right", "wan default", "")


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def encode(**inputs):
    positive, negative = text()
    args = dict(width=WIDTH, height=HEIGHT, frames=FRAMES, batch=1, strength=1.0) | inputs
    return vace_nodes.SoraVaceEncode().encode(positive, negative, load_vae(), **args)


def sample(model, positive, negative, latent, steps=2):
    sigmas = sampling.SoraScheduler().schedule(model, steps, 0.0, "wan_unipc", 1.0)[0]
    return sampling.SoraSampler().sample(model, positive, negative, latent, sigmas, 3, 5.0, "unipc", 1.0)


def captured_vace(model, *args):
    """Run the sampler and return what the model's `vace` input was on each call, and the outputs."""
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kwargs: seen.append(kwargs["vace"]), with_kwargs=True)
    try:
        out = sample(model, *args)
    finally:
        hook.remove()
    return seen, out


def hand_mask_channels(mask, latent_frames):
    """The 64 mask channels by hand: channel 8i + j of cell (y, x) is pixel (8y + i, 8x + j), and latent frame t
    reads pixel frame floor((t + 1/2)·F/T) (nearest-exact)."""
    F, H, W = mask.shape
    out = torch.zeros(64, latent_frames, H // 8, W // 8)
    for t in range(latent_frames):
        f = min(int((t + 0.5) * F / latent_frames), F - 1)
        for i in range(8):
            for j in range(8):
                out[8 * i + j, t] = mask[f, i::8, j::8]
    return out


def test_the_encode_node_builds_the_reference_channels():
    video = rand(FRAMES, HEIGHT, WIDTH, 3, seed=1)
    mask = (rand(FRAMES, HEIGHT, WIDTH, seed=2) > 0.5).float()
    positive, negative, latent = encode(control_video=video, control_masks=mask)
    extras = positive[0][1]
    assert len(extras["vace_frames"]) == len(extras["vace_mask"]) == len(extras["vace_strength"]) == 1
    frames, channels = extras["vace_frames"][0], extras["vace_mask"][0]
    # by hand: pixels in -1..1; inactive keeps what the mask leaves (0), reactive what it marks (1)
    pixels = video.permute(3, 0, 1, 2)[None] * 2 - 1  # [1, 3, F, H, W]
    m = mask[None, None]
    vae = load_vae()
    expected = torch.cat([vae.encode(pixels * (1 - m)), vae.encode(pixels * m)], dim=1)
    torch.testing.assert_close(frames, expected, rtol=1e-5, atol=1e-5)
    assert channels.shape == (1, 64, 3, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(channels[0], hand_mask_channels(mask, 3), rtol=0, atol=0)
    assert latent["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and "reference_frames" not in latent
    assert negative[0][1]["vace_frames"][0] is frames  # both passes read the same input


def test_defaults_are_a_gray_video_and_a_mask_of_ones():
    positive, _, _ = encode()
    frames, channels = positive[0][1]["vace_frames"][0], positive[0][1]["vace_mask"][0]
    gray = load_vae().encode(torch.zeros(1, 3, FRAMES, HEIGHT, WIDTH))
    torch.testing.assert_close(frames, torch.cat([gray, gray], dim=1), rtol=1e-5, atol=1e-5)
    assert torch.equal(channels, torch.ones_like(channels))


def test_reference_images_go_in_front_and_never_reach_the_output():
    references = rand(2, 48, 48, 3, seed=3)
    positive, negative, latent = encode(control_video=rand(FRAMES, HEIGHT, WIDTH, 3, seed=4),
                                        reference_image=references)
    frames, channels = positive[0][1]["vace_frames"][0], positive[0][1]["vace_mask"][0]
    assert latent["samples"].shape[2] == 3 + 2 and latent["reference_frames"] == 2
    assert frames.shape[2] == channels.shape[2] == 5
    vae = load_vae()
    for n in range(2):  # each reference: one frame of its own, centre-cropped to the video's aspect, then 16 zeros
        clip = references[n, 12:36].permute(2, 0, 1)[None, :, None] * 2 - 1  # 48x48, rows cut to 2:1
        clip = torch.nn.functional.interpolate(clip[:, :, 0], size=(HEIGHT, WIDTH), mode="bilinear",
                                               align_corners=False, antialias=True)[:, :, None]
        torch.testing.assert_close(frames[:, :16, n:n + 1], vae.encode(clip), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(WAN21.normalize(frames[:, 16:, n:n + 1]), torch.zeros(1, 16, 1, 4, 8),
                                   rtol=0, atol=1e-5)
    assert torch.equal(channels[:, :, :2], torch.zeros_like(channels[:, :, :2]))
    model = load_dit()
    seen, (out, denoised) = captured_vace(model, positive, negative, latent)
    assert seen[0][0][0].shape[2] == 5  # the model sampled the reference frames too
    for result in (out, denoised):  # and the outputs hold only the video
        assert result["samples"].shape == (1, 16, 3, 4, 8) and "reference_frames" not in result


def test_the_sampler_hands_the_normalised_context_to_the_model_and_inputs_stack():
    video = rand(FRAMES, HEIGHT, WIDTH, 3, seed=5)
    positive, negative, latent = encode(control_video=video, strength=0.7)
    vae = load_vae()
    positive, negative, latent = vace_nodes.SoraVaceEncode().encode(
        positive, negative, vae, WIDTH, HEIGHT, FRAMES, 1, 1.5, reference_image=None)  # a second input
    assert positive[0][1]["vace_strength"] == [0.7, 1.5]
    model = load_dit()
    seen, _ = captured_vace(model, positive, negative, latent)
    assert len(seen) == 2  # two steps
    for call in seen:
        assert [strength for _, strength in call] == [0.7, 1.5]
        for (context, _), frames, mask in zip(call, positive[0][1]["vace_frames"], positive[0][1]["vace_mask"]):
            expected = torch.cat([WAN21.normalize(frames[:, :16]), WAN21.normalize(frames[:, 16:]), mask], dim=1)
            assert context.shape == (2, 96, 3, 4, 8)  # cond and uncond batched
            torch.testing.assert_close(context, expected.expand(2, -1, -1, -1, -1), rtol=0, atol=0)


def test_a_vace_model_without_input_reads_comfyuis_default():
    model = load_dit()
    positive, negative = text()
    latent = {"samples": torch.zeros(1, 16, 3, 4, 8)}
    seen, _ = captured_vace(model, positive, negative, latent)
    (context, strength), = seen[0]
    zeros = WAN21.normalize(torch.zeros(1, 16, 3, 4, 8))
    torch.testing.assert_close(context[:1], torch.cat([zeros, zeros, torch.ones(1, 64, 3, 4, 8)], dim=1))
    assert strength == 1.0


def test_the_control_video_changes_the_result():
    model = load_dit()
    first = sample(model, *encode(control_video=rand(FRAMES, HEIGHT, WIDTH, 3, seed=6)))[0]["samples"]
    second = sample(model, *encode(control_video=rand(FRAMES, HEIGHT, WIDTH, 3, seed=7)))[0]["samples"]
    assert not torch.allclose(first, second, atol=1e-4)


def test_an_extension_becomes_the_vace_input_and_keeps_its_frames():
    clip = torch.randn(1, 16, 3, 4, 8, generator=torch.Generator().manual_seed(8))
    condition = frame_conditioning.SoraExtendForward().extend({"samples": clip}, 4, 8)[0]  # 1 kept + 2 new
    positive, negative, latent = encode(condition=condition)
    frames, channels = positive[0][1]["vace_frames"][0], positive[0][1]["vace_mask"][0]
    gray = load_vae().encode(torch.zeros(1, 3, 9, HEIGHT, WIDTH))
    # by hand: inactive = the kept latent frame, then the gray video's; reactive = the gray video's; mask 0 / 1
    torch.testing.assert_close(frames[:, :16, :1], clip[:, :, -1:], rtol=0, atol=0)
    torch.testing.assert_close(frames[:, :16, 1:], gray[:, :, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frames[:, 16:], gray, rtol=1e-5, atol=1e-5)
    assert torch.equal(channels[:, :, 0], torch.zeros_like(channels[:, :, 0]))
    assert torch.equal(channels[:, :, 1:], torch.ones_like(channels[:, :, 1:]))
    out = sample(load_dit(), positive, negative, latent)[0]["samples"]
    torch.testing.assert_close(out[:, :, :1], clip[:, :, -1:], rtol=0, atol=0)  # the kept frame, exactly


def test_errors_name_the_node_and_input():
    positive, negative, latent = encode(control_video=rand(FRAMES, HEIGHT, WIDTH, 3, seed=9))
    with pytest.raises(InputError, match=rf"^Sora Sampler: input 'positive' = CONDITIONING with a VACE input but "
                                         rf"{T2V} has no VACE branch"):
        sample(load_dit(T2V), positive, negative, latent)
    with pytest.raises(InputError, match=r"^Sora Sampler: input 'latent' = LATENT \[1, 16, 5, 4, 8\] does not "
                                         r"match VACE input 1"):
        sample(load_dit(), positive, negative, {"samples": torch.zeros(1, 16, 5, 4, 8)})
    with pytest.raises(InputError, match=r"^Sora VACE Encode: input 'vae' = VAE with 48 latent channels is not the "
                                         r"Wan 2.1 VAE"):
        vace_nodes.SoraVaceEncode().encode(*text(), load_vae("wan2.2_vae.safetensors"), WIDTH, HEIGHT, FRAMES, 1,
                                           1.0)
    with pytest.raises(InputError, match=r"^Sora VACE Encode: input 'condition' = LATENT comes with a control "
                                         r"video"):
        encode(control_video=rand(FRAMES, HEIGHT, WIDTH, 3), condition={"samples": torch.zeros(1, 16, 3, 4, 8)})
    with pytest.raises(InputError, match=r"^Sora VACE Encode: input 'frames' = 10 is not 1\+4k"):
        encode(frames=10)


def test_the_reference_frames_count_is_dropped_with_the_frames():
    latent = {"samples": torch.arange(5.0).view(1, 1, 5, 1, 1), "reference_frames": 2,
              "noise_mask": torch.ones(1, 1, 5, 1, 1)}
    out = vace.drop_reference_frames(latent)
    assert out["samples"].flatten().tolist() == [2.0, 3.0, 4.0] and out["noise_mask"].shape[2] == 3
    assert "reference_frames" not in out and latent["reference_frames"] == 2  # the input is left as it was
