"""mp4 writing and reading through PyAV: sizes, frame counts, rates, quality, atomic writes, errors."""
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from sora import video_io
from sora.errors import InputError


def moving_square(frames: int = 9, height: int = 32, width: int = 48) -> torch.Tensor:
    """A smooth gradient background with a white square moving right: [F, H, W, 3] in 0..1."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    video = torch.stack([x, y, 0.5 * (x + y)], dim=-1)[None].repeat(frames, 1, 1, 1)
    for f in range(frames):
        video[f, 8:16, 2 + 3 * f:10 + 3 * f] = 1.0
    return video


def probe(path):
    """(frames, width, height, rate, codec) as PyAV's demuxer reports them, without our reader."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        codec = stream.codec_context
        return count, codec.width, codec.height, stream.average_rate, codec.name


@pytest.mark.parametrize("fps, rate", [(16, Fraction(16)), (24.0, Fraction(24)), (23.976, Fraction(24000, 1001))])
def test_mp4_has_the_frames_size_and_rate_asked_for(tmp_path, fps, rate):
    clip = moving_square()
    path = video_io.write_mp4(tmp_path / "clip.mp4", clip, fps)
    assert probe(path) == (9, 48, 32, rate, "h264")
    video = video_io.read_video(path)
    assert video.frames.shape == (9, 32, 48, 3) and video.frames.dtype == torch.float32
    assert video.fps == pytest.approx(float(rate))


def test_round_trip_is_close_and_the_motion_survives(tmp_path):
    clip = moving_square()
    video = video_io.read_video(video_io.write_mp4(tmp_path / "clip.mp4", clip, 16, crf=10)).frames
    assert (video - clip).abs().mean() < 0.02
    # the square's left edge is where it was drawn in every frame (column of the brightest pixels in row 12)
    for f in range(9):
        bright = (video[f, 12, :, 0] > 0.9).nonzero().flatten()
        assert abs(int(bright.min()) - (2 + 3 * f)) <= 1


def test_the_file_gets_the_usual_permissions(tmp_path):
    (tmp_path / "plain").write_bytes(b"")
    path = video_io.write_mp4(tmp_path / "clip.mp4", moving_square(), 16)
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_metadata_tags_are_stored(tmp_path):
    tags = {"workflow": '{"nodes": []}', "prompt": '{"1": {}}', "comment": "ünïcode"}
    path = video_io.write_mp4(tmp_path / "clip.mp4", moving_square(), 16, metadata=tags)
    with av.open(str(path)) as container:
        assert {k: container.metadata.get(k) for k in tags} == tags


def test_higher_crf_gives_a_smaller_file(tmp_path):
    clip = moving_square(frames=17) + 0.05 * torch.rand(17, 32, 48, 3)
    fine = video_io.write_mp4(tmp_path / "fine.mp4", clip.clamp(0, 1), 16, crf=5)
    coarse = video_io.write_mp4(tmp_path / "coarse.mp4", clip.clamp(0, 1), 16, crf=45)
    assert coarse.stat().st_size < fine.stat().st_size / 2


def test_failed_encode_leaves_no_file(tmp_path, monkeypatch):
    real = av.VideoFrame.from_ndarray
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        video_io.write_mp4(tmp_path / "clip.mp4", moving_square(), 16)
    assert len(calls) == 4 and os.listdir(tmp_path) == []


def test_failed_encode_keeps_an_existing_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"earlier")
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        video_io.write_mp4(target, moving_square(), 16)
    assert target.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["clip.mp4"]


@pytest.mark.parametrize("frames, fps, crf, message", [
    (torch.rand(3, 31, 48, 3), 16, 19, "even width and height.*48x30"),
    (torch.rand(3, 32, 48), 16, 19, r"\[frames, height, width, 3\]"),
    (torch.rand(0, 32, 48, 3), 16, 19, "empty"),
    (torch.rand(3, 32, 48, 3), 0, 19, "fps must be > 0"),
    (torch.rand(3, 32, 48, 3), 16, 52, "crf must be"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, frames, fps, crf, message):
    with pytest.raises(InputError, match=message):
        video_io.write_mp4(tmp_path / "clip.mp4", frames, fps, crf=crf)
    assert os.listdir(tmp_path) == []


def test_read_video_skips_and_caps_frames(tmp_path):
    clip = moving_square(frames=9)
    path = video_io.write_mp4(tmp_path / "clip.mp4", clip, 16, crf=0)
    everything = video_io.read_video(path).frames
    part = video_io.read_video(path, skip_frames=2, max_frames=5).frames
    assert part.shape[0] == 5 and torch.equal(part, everything[2:7])
    with pytest.raises(InputError, match="no frames after skipping 9"):
        video_io.read_video(path, skip_frames=9)


def test_unreadable_and_missing_files_are_named(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(Exception, match="notes.mp4"):
        video_io.read_video(tmp_path / "notes.mp4")
    with pytest.raises(InputError, match="does not exist"):
        video_io.read_video(tmp_path / "missing.mp4")


def test_png_round_trip_is_exact(tmp_path):
    image = torch.randint(0, 256, (1, 20, 30, 3)).float() / 255
    path = video_io.write_png(tmp_path / "frame.png", image)
    assert torch.equal(video_io.read_image(path), image)


def test_resize_matches_pillow():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    frames = torch.from_numpy(pixels).float()[None] / 255
    for size in [(32, 20), (96, 60)]:  # shrinking (antialiased) and enlarging
        ours = video_io.resize_frames(frames, *size)[0]
        theirs = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR)).astype(np.float32) / 255
        assert ours.shape == (size[1], size[0], 3)
        assert (ours - torch.from_numpy(theirs)).abs().max() < 3 / 255


@pytest.mark.parametrize("frames, height, width, runs", [(33, 64, 64, 12), (9, 240, 416, 8)])
def test_the_same_frames_give_the_same_file_every_time(tmp_path, frames, height, width, runs):
    """Lossy H.264 of one set of frames is one file (libx264's mbtree rate control gave other pixels, up to
    ~30/255, from run to run)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, frames, height // 4, width // 4, generator=generator)
    clip = torch.nn.functional.interpolate(noise, size=(frames, height, width), mode="trilinear")
    video = clip[0].permute(1, 2, 3, 0)  # smooth, non-contiguous [F, H, W, 3]
    written = {video_io.write_mp4(tmp_path / f"{i}.mp4", video, 16, crf=19).read_bytes() for i in range(runs)}
    assert len(written) == 1
