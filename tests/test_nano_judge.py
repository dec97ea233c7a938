"""The nano judge names the colour and direction of generator clips, and is not fooled by controls."""
import dataclasses

import av
import pytest
import torch

from sora.errors import InputError
from sora.nano import data, judge
from sora.nano import vocabulary as vocab

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
MIRRORED = {"left": "right", "right": "left", "up": "up", "down": "down"}


def write_mp4(video: torch.Tensor, path, fps: int = 16) -> None:
    """[3, F, H, W] in -1..1 -> H.264 mp4 (yuv420p), as a user's saved video would be."""
    frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[3], video.shape[2], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("color", sorted(vocab.COLORS))
def test_judge_is_right_on_every_colour_and_direction(color):
    for direction in vocab.DIRECTIONS:
        for seed in range(3):  # each seed draws another shape, size, speed, background and position
            clip = data.make_clip(seed, color=color, direction=direction)
            verdict = judge.judge_video(clip.video)
            assert (verdict.color, verdict.direction) == (color, direction), (clip.scene, verdict)
            assert verdict.color_confidence > 0.3 and verdict.direction_confidence > 0.9
            assert verdict.visible == 1.0
            # the fitted travel is the scene's own, to a fraction of a pixel
            travel = [s * (clip.video.shape[1] - 1) for s in clip.scene.step]
            assert verdict.displacement == pytest.approx(travel, abs=0.5)


def test_reversed_and_mirrored_clips_flip_the_verdict():
    for seed, direction in enumerate(vocab.DIRECTIONS):
        video = data.make_clip(seed, direction=direction).video
        assert judge.judge_video(video.flip(1)).direction == OPPOSITE[direction]
        assert judge.judge_video(video.flip(3)).direction == MIRRORED[direction]


def test_still_and_empty_clips_have_no_direction():
    clip = data.make_clip(4, color="red", background="gray")
    still = data.render(dataclasses.replace(clip.scene, step=(0.0, 0.0)), 33, 64, 64)
    verdict = judge.judge_video(still)
    assert verdict.color == "red" and verdict.direction is None and verdict.direction_confidence == 0
    empty = judge.judge_video(torch.full((3, 33, 64, 64), -0.1))
    assert empty.color is None and empty.direction is None and empty.visible == 0


def test_recoloured_scene_changes_only_the_colour():
    scene = data.make_clip(9, color="cyan", direction="up", background="dark").scene
    for color in ("yellow", "purple", "orange"):
        verdict = judge.judge_video(data.render(dataclasses.replace(scene, color=color), 33, 64, 64))
        assert (verdict.color, verdict.direction) == (color, "up")


def test_judge_reads_an_mp4_file(tmp_path):
    for seed, (color, direction) in enumerate([("orange", "left"), ("blue", "down"), ("yellow", "right")]):
        clip = data.make_clip(seed, color=color, direction=direction)
        path = tmp_path / f"clip{seed}.mp4"
        write_mp4(clip.video, path)
        verdict = judge.judge_file(path)
        assert (verdict.color, verdict.direction) == (color, direction)
    with pytest.raises(InputError, match="does not exist"):
        judge.judge_file(tmp_path / "missing.mp4")


def test_bad_video_shape_is_an_input_error():
    with pytest.raises(InputError, match=r"\[3, F, H, W\]"):
        judge.judge_video(torch.zeros(33, 64, 64, 3))


def test_continuity_accepts_a_straight_path_and_rejects_turns_and_jumps():
    clip = data.make_clip(2, direction="right", speed="fast", size="small")
    straight = judge.continuity(clip.video, join=17)
    assert straight.continues and straight.jump < straight.limit
    assert straight.before.direction == straight.after.direction == "right"

    turned = torch.cat([clip.video[:, :17], clip.video[:, :17].flip(1)], dim=1)  # comes back the way it went
    result = judge.continuity(turned, join=17)
    assert not result.continues and result.after.direction == "left"

    x, y = clip.scene.start
    moved = dataclasses.replace(clip.scene, start=(x, y + 20 if y < 32 else y - 20))
    jumped = torch.cat([clip.video[:, :17], data.render(moved, 33, 64, 64)[:, 17:]], dim=1)  # same motion, shifted
    result = judge.continuity(jumped, join=17)
    assert result.after.direction == "right" and result.jump > result.limit and not result.continues

    with pytest.raises(InputError, match="join=32"):
        judge.continuity(clip.video, join=32)
