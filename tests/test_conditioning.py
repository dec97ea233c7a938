"""Known latent frames: the one mechanism behind image-to-video, extension, connecting, looping and joining."""
import pytest
import torch
from test_sampling_fakes import TinyDiT, tiny_context

from sora import conditioning
from sora.errors import InputError
from sora.latent_formats import WAN21
from sora.samplers import initial_noise, sample
from sora.schedules import flow_sigmas


def _clip(frames: int, seed: int = 0) -> torch.Tensor:
    """A raw Wan 2.1 latent clip [1, 16, T, 4, 4] (mean + std · normal noise)."""
    generator = torch.Generator().manual_seed(seed)
    return WAN21.denormalize(torch.randn(1, 16, frames, 4, 4, generator=generator))


def _generate(condition, per_token, sampler="unipc", model=None, seed=0):
    model = model or TinyDiT(per_token=per_token)
    return sample(model, condition["samples"], flow_sigmas(6, 5.0), tiny_context(), tiny_context(seed=1),
                  guidance=3.0, sampler=sampler, seed=seed, noise_mask=condition["noise_mask"])


def test_condition_is_a_core_latent_with_noise_mask():
    clip = _clip(5)
    condition = conditioning.extend_forward(clip, overlap=2, new_frames=3)
    samples, mask = condition["samples"], condition["noise_mask"]
    assert samples.shape == (1, 16, 5, 4, 4) and mask.shape == (1, 1, 5, 4, 4)  # as Wan22ImageToVideoLatent
    assert torch.equal(samples[:, :, :2], clip[:, :, -2:]) and (samples[:, :, 2:] == 0).all()
    assert mask[0, 0, :, 0, 0].tolist() == [0, 0, 1, 1, 1]  # ComfyUI: 1 = generate, 0 = keep


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("sampler", ["unipc", "dpm++_2m", "euler"])
def test_known_frames_come_back_exactly(per_token, sampler):
    clip = _clip(4)
    condition = conditioning.extend_forward(clip, overlap=2, new_frames=2)
    out = _generate(condition, per_token, sampler)
    assert torch.equal(out[:, :, :2], clip[:, :, -2:])
    assert not torch.equal(out[:, :, 2:], condition["samples"][:, :, 2:]) and torch.isfinite(out).all()


def test_per_token_models_see_clean_known_frames_at_timestep_zero():
    clip = _clip(3)
    condition = conditioning.image_to_video(clip[:, :, :1], latent_frames=3)
    model = TinyDiT(per_token=True)
    model.record = True
    _generate(condition, per_token=True, model=model)
    clean = WAN21.normalize(clip[:, :, :1])
    sigmas = flow_sigmas(6, 5.0)
    for step, (x, timestep, _) in enumerate(model.calls):
        assert timestep.shape == (2, 3)  # [cond; uncond] × latent frames
        assert (timestep[:, 0] == 0).all()
        torch.testing.assert_close(timestep[:, 1:], torch.full((2, 2), sigmas[step].item() * 1000))
        assert torch.equal(x[:1, :, :1], clean)


def test_other_models_see_known_frames_at_the_current_noise_level():
    clip = _clip(3)
    condition = conditioning.image_to_video(clip[:, :, :1], latent_frames=3)
    model = TinyDiT(per_token=False)
    model.record = True
    _generate(condition, per_token=False, model=model, seed=11)
    clean = WAN21.normalize(clip[:, :, :1])
    noise = initial_noise((1, 16, 3, 4, 4), seed=11)[:, :, :1]  # the run's fixed noise
    sigmas = flow_sigmas(6, 5.0)
    for step, (x, timestep, _) in enumerate(model.calls):
        sigma = sigmas[step].item()
        assert timestep.shape == (2,) and (timestep == sigma * 1000).all()
        torch.testing.assert_close(x[:1, :, :1], (1 - sigma) * clean + sigma * noise, rtol=1e-6, atol=1e-6)


def test_join_forward_extension_has_no_duplicated_or_dropped_frames():
    clip, overlap, new = _clip(5), 2, 3
    part = _generate(conditioning.extend_forward(clip, overlap, new), per_token=True)
    joined = conditioning.join([clip, part], overlap)
    assert joined.shape[2] == 5 + new
    assert WAN21.latent_to_frames(joined.shape[2]) == WAN21.latent_to_frames(5) + 4 * new  # F + 4N pixel frames
    assert torch.equal(joined[:, :, :5], clip) and torch.equal(joined[:, :, 5:], part[:, :, overlap:])
    frames = [joined[:, :, i] for i in range(joined.shape[2])]
    assert all(not torch.equal(a, b) for i, a in enumerate(frames) for b in frames[i + 1:])  # no seam duplicates
    # A second extension of the joined clip continues the same way.
    part2 = _generate(conditioning.extend_forward(joined, overlap, 2), per_token=True, seed=1)
    assert conditioning.join([clip, part, part2], overlap).shape[2] == 5 + new + 2


def test_join_backward_connect_and_loop():
    a, b, overlap, new = _clip(4, seed=0), _clip(3, seed=1), 1, 2
    lead = _generate(conditioning.extend_backward(a, overlap, new), per_token=False)
    assert torch.equal(lead[:, :, new:], a[:, :, :overlap])
    backward = conditioning.join([lead, a], overlap)
    assert backward.shape[2] == new + 4 and torch.equal(backward[:, :, new:], a)

    bridge = _generate(conditioning.connect(a, b, overlap, new), per_token=True)
    assert bridge.shape[2] == 2 * overlap + new
    connected = conditioning.join([a, bridge, b], overlap)
    assert connected.shape[2] == 4 + new + 3
    assert torch.equal(connected[:, :, :4], a) and torch.equal(connected[:, :, -3:], b)

    looped_bridge = _generate(conditioning.loop(a, overlap, new), per_token=True)
    looped = conditioning.join([a, looped_bridge], overlap, loop=True)
    assert looped.shape[2] == 4 + new
    assert torch.equal(looped[:, :, :4], a) and torch.equal(looped_bridge[:, :, -overlap:], a[:, :, :overlap])


def test_join_refuses_parts_that_do_not_overlap():
    with pytest.raises(InputError, match="not the first"):
        conditioning.join([_clip(4, seed=0), _clip(4, seed=1)], overlap=2)
    with pytest.raises(InputError, match="two parts"):
        conditioning.join([_clip(4)], overlap=1)


def test_image_to_video_keeps_the_first_frame():
    image = _clip(1)
    condition = conditioning.image_to_video(image, latent_frames=4)
    assert condition["noise_mask"][0, 0, :, 0, 0].tolist() == [0, 1, 1, 1]
    out = _generate(condition, per_token=False)
    assert out.shape[2] == 4 and torch.equal(out[:, :, :1], image)


def test_video_to_video_strength():
    video, sigmas = _clip(3), flow_sigmas(8, 5.0)
    latent, tail = conditioning.video_to_video(video, sigmas, strength=0.0)
    out = sample(TinyDiT(), latent["samples"], tail, tiny_context(), guidance=1.0)
    assert torch.equal(out, video)  # strength 0: the input, exactly
    latent, tail = conditioning.video_to_video(video, sigmas, strength=0.5)
    assert torch.equal(tail, sigmas[-5:])
    weak = sample(TinyDiT(), latent["samples"], tail, tiny_context(), guidance=1.0)
    strong = sample(TinyDiT(), video, sigmas, tiny_context(), guidance=1.0)
    # The less noise is added, the closer the result stays to the input.
    assert (weak - video).norm() < (strong - video).norm()


def test_wan_i2v_channels_follow_the_reference_layout():
    # ARCH_FACTS §4.7: 4 mask channels then the normalised latent; latent frame 0 is all ones for I2V, and with the
    # last pixel frame known too (FLF2V) the last latent frame reads [0, 0, 0, 1].
    video = _clip(3)
    channels = conditioning.wan_i2v_channels(video, WAN21)
    assert channels.shape == (1, 20, 3, 4, 4)
    assert channels[0, :4, :, 1, 2].T.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert torch.equal(channels[:, 4:], WAN21.normalize(video))
    first_last = conditioning.wan_i2v_channels(video, WAN21, known=(0, -1))
    assert first_last[0, :4, :, 0, 0].T.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    # Pixel frame 6 is the second slot of latent frame 2 (slot k of latent frame j is pixel frame 4j + k - 3).
    assert conditioning.wan_i2v_channels(video, WAN21, known=(6,))[0, :4, 2, 0, 0].tolist() == [0, 1, 0, 0]
    with pytest.raises(InputError, match="outside"):
        conditioning.wan_i2v_channels(video, WAN21, known=(9,))


def test_builders_validate_counts_and_shapes():
    clip = _clip(3)
    with pytest.raises(InputError, match="overlap"):
        conditioning.extend_forward(clip, overlap=4, new_frames=1)
    with pytest.raises(InputError, match="new_frames"):
        conditioning.extend_backward(clip, overlap=1, new_frames=0)
    with pytest.raises(InputError, match="must match"):
        conditioning.connect(clip, torch.zeros(1, 48, 3, 4, 4), 1, 1)
    with pytest.raises(InputError, match="latent_frames"):
        conditioning.image_to_video(clip[:, :, :1], latent_frames=1)
    with pytest.raises(InputError, match=r"\[B, C, T, H, W\]"):
        conditioning.extend_forward(clip[0], 1, 1)
    with pytest.raises(InputError, match="noise_mask"):
        sample(TinyDiT(), clip, flow_sigmas(3, 5.0), tiny_context(), guidance=1.0, noise_mask=torch.ones(3, 4, 4))
    with pytest.raises(InputError, match="does not fit"):
        sample(TinyDiT(), clip, flow_sigmas(3, 5.0), tiny_context(), guidance=1.0,
               noise_mask=torch.ones(1, 1, 5, 4, 4))
