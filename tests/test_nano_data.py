"""The synthetic clip generator: deterministic, in the sora video convention, and showing what it says."""
import random

import pytest
import torch

from sora.errors import InputError
from sora.nano import data
from sora.nano import vocabulary as vocab


def test_same_seed_same_clip_and_different_seeds_differ():
    a, b, c = data.make_clip(7), data.make_clip(7), data.make_clip(8)
    assert torch.equal(a.video, b.video) and a.caption == b.caption and a.scene == b.scene
    assert not torch.equal(a.video, c.video)


@pytest.mark.parametrize("frames,height,width", [(33, 64, 64), (17, 48, 80), (1, 32, 32)])
def test_video_layout_and_range(frames, height, width):
    video = data.make_clip(3, frames=frames, height=height, width=width).video
    assert video.shape == (3, frames, height, width) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1


def test_pixels_are_the_named_colours_and_the_object_moves_as_the_scene_says():
    clip = data.make_clip(11, color="green", background="dark", shape="square", direction="left", speed="fast")
    scene = clip.scene
    rgb = (clip.video + 1) / 2
    fg = torch.tensor(vocab.COLORS["green"])
    bg = torch.tensor(vocab.BACKGROUNDS["dark"])
    for frame in (0, 16, 32):
        x, y = scene.centre(frame)
        assert torch.allclose(rgb[:, frame, int(y), int(x)], fg, atol=1e-6)
        # the object's pixels (weighted by coverage) are centred where the scene puts the object
        coverage = (rgb[:, frame] - bg.view(3, 1, 1)).norm(dim=0) / (fg - bg).norm()
        ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
        assert abs(float((coverage * xs).sum() / coverage.sum()) - x) < 0.05
        assert abs(float((coverage * ys).sum() / coverage.sum()) - y) < 0.05
    assert torch.allclose(rgb[:, :, 0, 0], bg.view(3, 1).expand(3, 33), atol=1e-6)
    # a square of half-size r covers (2r)^2 pixels
    coverage0 = (rgb[:, 0] - bg.view(3, 1, 1)).norm(dim=0) / (fg - bg).norm()
    assert abs(float(coverage0.sum()) - (2 * scene.radius) ** 2) < 1.0
    assert scene.step[0] == pytest.approx(-data.SPEED_FRACTION["fast"] * 64) and scene.step[1] == 0


@pytest.mark.parametrize("direction", sorted(vocab.DIRECTIONS))
def test_object_stays_inside_the_frame_for_the_whole_clip(direction):
    for seed in range(20):
        scene = data.make_clip(seed, direction=direction, size="large", speed="fast").scene
        for frame in (0, 32):
            x, y = scene.centre(frame)
            assert scene.radius <= x <= 64 - scene.radius and scene.radius <= y <= 64 - scene.radius


@pytest.mark.parametrize("direction", sorted(vocab.DIRECTIONS))
def test_object_crosses_near_the_middle_line_in_the_named_direction(direction):
    ux, uy = vocab.DIRECTIONS[direction]
    lane = data.LANE_FRACTION * 64
    across = []
    for seed in range(40):
        scene = data.make_clip(seed, direction=direction).scene
        (x0, y0), (x1, y1) = scene.centre(0), scene.centre(32)
        along0, along1, off, drift = (x0, x1, y0, y1 - y0) if ux else (y0, y1, x0, x1 - x0)
        assert abs(off - 32) <= lane and drift == 0
        assert (along1 - along0) * (ux + uy) > 0
        across.append(off)
    assert max(across) - min(across) > lane  # the lane is a band, not a line


def test_caption_names_colour_shape_and_direction_of_the_scene():
    for seed in range(40):
        clip = data.make_clip(seed)
        s, text = clip.scene, clip.caption
        assert f" {s.color} " in f" {text} "
        assert any(f" {noun} " in f" {text} " for noun in vocab.SHAPES[s.shape])
        assert any(phrase in text for phrase in vocab.DIRECTION_PHRASES[s.direction])
        assert not any(phrase in text for d, ps in vocab.DIRECTION_PHRASES.items() if d != s.direction for phrase in ps)
        assert text.startswith("an " if text.split()[1][0] in "aeiou" else "a ")


def test_captions_vary_and_use_every_direction_phrase():
    rng = random.Random(0)
    captions = [data.write_caption(data.sample_scene(rng, 33, 64, 64), rng) for _ in range(400)]
    assert len(set(captions)) > 300
    for phrases in vocab.DIRECTION_PHRASES.values():
        for phrase in phrases:
            assert any(phrase in c for c in captions), phrase


def test_backgrounds_never_hide_the_object():
    rng = random.Random(0)
    for _ in range(200):
        scene = data.sample_scene(rng, 33, 64, 64, color="white")
        assert scene.background != "light"
    with pytest.raises(InputError, match="too faint"):
        data.make_clip(0, color="white", background="light")


def test_bad_arguments_say_what_to_change():
    with pytest.raises(InputError, match="1 \\+ 4k; use 33 or 37"):
        data.make_clip(0, frames=35)
    with pytest.raises(InputError, match="unknown colour 'pink'"):
        data.make_clip(0, color="pink")
    with pytest.raises(InputError, match="too small"):
        data.make_clip(0, height=8)
