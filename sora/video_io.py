"""Video and image files through PyAV: H.264 mp4 writing, and reading clips and still images as frames.

Frames are ComfyUI's `IMAGE` layout: float32 `[frames, H, W, 3]` in 0..1. Writing is atomic: the mp4 is encoded
into a hidden temporary file in the destination folder and renamed over the final name only when encoding has
finished, so a failed or interrupted encode never leaves a partial file behind.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import CheckpointError, InputError

DEFAULT_CRF = 19  # libx264: 0 is lossless, 51 the worst; about 17-23 looks clean for generated video
MAX_CRF = 51
NTSC = Fraction(1000, 1001)  # 23.976, 29.97, 59.94 fps are n·1000/1001


@dataclass(frozen=True)
class Video:
    """Decoded frames [F, H, W, 3] float32 in 0..1 and the stream's frame rate."""
    frames: torch.Tensor
    fps: float


def check_frames(frames: torch.Tensor, what: str = "frames") -> None:
    """Raise InputError unless `frames` is an IMAGE batch [F, H, W, 3] with at least one frame."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InputError(f"{what} must be IMAGE frames [frames, height, width, 3] in 0..1, got {shape}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise InputError(f"{what} are empty: shape {list(frames.shape)}")


def frames_to_clip(frames: torch.Tensor) -> torch.Tensor:
    """IMAGE frames [F, H, W, 3] in 0..1 -> one clip [1, 3, F, H, W] in -1..1, as the VAE takes it."""
    return rearrange(frames.float(), "f h w c -> 1 c f h w") * 2.0 - 1.0


def clip_to_frames(video: torch.Tensor) -> torch.Tensor:
    """Clips [B, 3, F, H, W] in -1..1 -> IMAGE frames [B·F, H, W, 3] in 0..1, one clip after the other."""
    return (rearrange(video, "b c f h w -> (b f) h w c") + 1.0) / 2.0


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """IMAGE frames in 0..1 -> uint8 [F, H, W, 3] on the CPU (NaN becomes 0)."""
    return (frames.detach().float().nan_to_num(0.0).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()


def frame_rate(fps: float) -> Fraction:
    """`fps` as an exact rate; 23.976 and the other rounded NTSC rates become n·1000/1001."""
    ntsc = round(fps / NTSC)
    if ntsc and abs(fps - ntsc * NTSC) < 1e-3:
        return ntsc * NTSC
    return Fraction(fps).limit_denominator(1000)


def write_mp4(path: str | Path, frames: torch.Tensor, fps: float, *, crf: int = DEFAULT_CRF,
              metadata: dict[str, str] | None = None) -> Path:
    """Encode IMAGE frames [F, H, W, 3] (0..1) as an H.264 (yuv420p) mp4 at `path`, atomically.

    fps: frames per second (> 0); crf: libx264 constant rate factor, 0 (lossless) .. 51. H.264 in yuv420p needs an
    even width and height. metadata: text tags stored in the file (ComfyUI keeps "prompt" and "workflow" there, so
    a saved video drops back into the editor as its workflow). The file appears only when encoding succeeded; on
    any error nothing is left at `path` and no temporary file remains.
    """
    import av  # PyAV is only needed by the code that writes or reads media

    check_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise InputError(f"H.264 video needs an even width and height, got {width}x{height}; resize or crop the "
                         f"frames to {width - width % 2}x{height - height % 2}")
    if not fps > 0:
        raise InputError(f"fps must be > 0, got {fps}")
    if not (isinstance(crf, int) and 0 <= crf <= MAX_CRF):
        raise InputError(f"crf must be a whole number from 0 (lossless) to {MAX_CRF}, got {crf!r}")
    path = Path(path)
    pixels = to_uint8(frames).numpy()
    # A unique hidden name beside the target (mkstemp would create it with mode 0600, not the umask's).
    temporary = str(path.parent / f".{path.stem}.{uuid.uuid4().hex}.partial.mp4")
    try:
        # use_metadata_tags: mp4 keeps arbitrary keys such as "workflow" (plain mp4 keeps only its standard tags)
        with av.open(temporary, mode="w", format="mp4", options={"movflags": "use_metadata_tags"}) as container:
            container.metadata.update(metadata or {})
            stream = container.add_stream("libx264", rate=frame_rate(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # mbtree=0: one seed, one file. With libx264's macroblock-tree rate control (its default) the same
            # frames gave other bytes from run to run, up to ~30/255 apart in a pixel at crf 19, more often the
            # busier the machine (measured with PyAV 18; without x264's assembly, or without mbtree, they do not).
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            for image in pixels:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _open_error(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read {path} as video or image ({type(error).__name__}: {error}); "
                           "give an mp4/webm/mov/gif or png/jpg/webp file")


def read_video(path: str | Path, *, max_frames: int = 0, skip_frames: int = 0) -> Video:
    """Decode a video file to IMAGE frames [F, H, W, 3] float32 in 0..1.

    skip_frames: frames dropped at the start; max_frames: the most frames returned after that (0 = all).
    """
    import av

    path = Path(path)
    if max_frames < 0 or skip_frames < 0:
        raise InputError(f"max_frames and skip_frames must be >= 0, got {max_frames} and {skip_frames}")
    if not path.is_file():
        raise InputError(f"video file {path} does not exist")
    images = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 0
            for index, frame in enumerate(container.decode(stream)):
                if index < skip_frames:
                    continue
                images.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if max_frames and len(images) == max_frames:
                    break
    except av.FFmpegError as e:
        raise _open_error(path, e) from None
    if not images:
        raise InputError(f"{path} has no frames after skipping {skip_frames}; lower skip_frames")
    return Video(torch.stack(images).float() / 255.0, float(rate))


def read_image(path: str | Path) -> torch.Tensor:
    """Decode a still image (png, jpg, webp, ...) to IMAGE [1, H, W, 3] float32 in 0..1."""
    video = read_video(path, max_frames=1)
    return video.frames


def write_png(path: str | Path, image: torch.Tensor) -> Path:
    """Write IMAGE [1, H, W, 3] (or [H, W, 3]) in 0..1 as an 8-bit RGB png."""
    import av

    if isinstance(image, torch.Tensor) and image.ndim == 3:
        image = image[None]
    check_frames(image, "image")
    pixels = to_uint8(image[:1]).numpy()[0]
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = pixels.shape[1], pixels.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def resize_frames(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE frames [F, H, W, 3] resized to `width` x `height` (bilinear, antialiased when shrinking)."""
    check_frames(frames)
    if width < 1 or height < 1:
        raise InputError(f"a size must be at least 1x1, got {width}x{height}")
    if frames.shape[1:3] == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).float()  # [F, 3, H, W]
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()
