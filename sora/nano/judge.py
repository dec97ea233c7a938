"""The nano judge: which vocabulary colour the object in a clip has, and which way it moves.

It reads a video the way a person would, with no model: the background is the colour most pixels have, the
object is whatever differs from it, its colour is the nearest vocabulary colour to its core pixels (the eight of
`vocabulary.COLORS` and the LoRA-taught ones of `vocabulary.EXTRA_COLORS`), and its direction is the dominant
axis of a straight line fitted to the object's centroid track.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..video_io import read_video
from . import vocabulary as vocab

OBJECT_DISTANCE = 0.2  # RGB distance (0..1) from the background above which a pixel belongs to the object
MIN_PIXELS = 4  # object pixels a frame needs before its centroid counts
MIN_TRAVEL = 0.04  # fitted travel, as a fraction of the shorter side, below which the object counts as still
JUMP_STEPS = 3.0  # a join may move the object by this many per-frame steps ...
JUMP_FRACTION = 0.05  # ... plus this fraction of the shorter side, and still count as continuous


@dataclass(frozen=True)
class Verdict:
    color: str | None  # nearest vocabulary colour of the object; None when no object is found
    color_confidence: float  # 0..1: how much nearer the chosen colour is than the runner-up
    direction: str | None  # a key of vocabulary.DIRECTIONS; None when the object does not move
    direction_confidence: float  # 0..1: how much the dominant axis outweighs the other one
    displacement: tuple[float, float]  # fitted (dx, dy) in pixels from the first to the last frame
    visible: float  # share of frames in which the object was found


@dataclass(frozen=True)
class Continuity:
    before: Verdict  # frames before the join
    after: Verdict  # frames from the join on
    jump: float  # centroid distance across the join, in pixels (inf when the object is missing there)
    limit: float  # the largest jump that still counts as continuous
    continues: bool  # same direction on both sides and no jump at the join


def _rgb(video: torch.Tensor) -> torch.Tensor:
    if video.ndim != 4 or video.shape[0] != 3:
        raise InputError(f"the judge reads one video [3, F, H, W] in -1..1, got shape {tuple(video.shape)}")
    return ((video.float() + 1) / 2).clamp(0, 1)


def background_color(rgb: torch.Tensor) -> torch.Tensor:
    """Per-channel median over every pixel of [3, F, H, W]: the object covers far less than half the frame."""
    return rgb.flatten(1).median(dim=1).values


def object_mask(rgb: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """[F, H, W] bool: pixels far enough from the background colour to belong to the object."""
    return (rgb - background.view(3, 1, 1, 1)).norm(dim=0) > OBJECT_DISTANCE


def centroid_track(mask: torch.Tensor) -> torch.Tensor:
    """[F, 2] object centre (x, y) in pixels per frame; NaN where fewer than MIN_PIXELS pixels are found."""
    _, height, width = mask.shape
    weight = mask.float()
    count = weight.sum(dim=(1, 2))
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    x = (weight.sum(dim=1) * xs).sum(dim=1) / count.clamp(min=1)
    y = (weight.sum(dim=2) * ys).sum(dim=1) / count.clamp(min=1)
    track = torch.stack([x, y], dim=1)
    track[count < MIN_PIXELS] = float("nan")
    return track


def name_color(rgb: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> tuple[str | None, float]:
    """Nearest vocabulary colour to the object's core (its half farthest from the background) and a confidence."""
    pixels = rgb.permute(1, 2, 3, 0)[mask]  # [N, 3]
    if len(pixels) < MIN_PIXELS:
        return None, 0.0
    distance = (pixels - background).norm(dim=1)
    core = pixels[distance >= distance.median()]
    color = core.median(dim=0).values
    names = list(vocab.ALL_COLORS)
    palette = torch.tensor([vocab.ALL_COLORS[n] for n in names])
    d = (palette - color).norm(dim=1)
    nearest, second = d.topk(2, largest=False).values.tolist()
    return names[int(d.argmin())], (second - nearest) / (second + nearest)


def fit_displacement(track: torch.Tensor) -> tuple[float, float] | None:
    """Least-squares straight line through the visible centroids; its (dx, dy) over the clip, or None."""
    frames = len(track)
    t = torch.arange(frames, dtype=torch.float32)
    seen = ~track[:, 0].isnan()
    if int(seen.sum()) < 2:
        return None
    t, xy = t[seen], track[seen]
    tc = t - t.mean()
    slope = (tc.unsqueeze(1) * (xy - xy.mean(dim=0))).sum(dim=0) / (tc * tc).sum()
    dx, dy = (slope * (frames - 1)).tolist()
    return dx, dy


def name_direction(displacement: tuple[float, float] | None, side: int) -> tuple[str | None, float]:
    """The vocabulary direction of the dominant axis, and how strongly it dominates (0..1)."""
    if displacement is None:
        return None, 0.0
    dx, dy = displacement
    major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if major < MIN_TRAVEL * side:
        return None, 0.0
    unit = (int(math.copysign(1, dx)), 0) if abs(dx) >= abs(dy) else (0, int(math.copysign(1, dy)))
    direction = next(name for name, u in vocab.DIRECTIONS.items() if u == unit)
    return direction, (major - minor) / (major + minor)


def _judge_rgb(rgb: torch.Tensor, background: torch.Tensor) -> tuple[Verdict, torch.Tensor]:
    mask = object_mask(rgb, background)
    track = centroid_track(mask)
    color, color_confidence = name_color(rgb, mask, background)
    displacement = fit_displacement(track)
    direction, direction_confidence = name_direction(displacement, min(rgb.shape[2:]))
    verdict = Verdict(color=color, color_confidence=color_confidence, direction=direction,
                      direction_confidence=direction_confidence, displacement=displacement or (0.0, 0.0),
                      visible=float((~track[:, 0].isnan()).float().mean()))
    return verdict, track


def judge_video(video: torch.Tensor) -> Verdict:
    """Judge one video [3, F, H, W] in -1..1."""
    rgb = _rgb(video)
    return _judge_rgb(rgb, background_color(rgb))[0]


def judge_file(path: str | Path) -> Verdict:
    """Judge a video file (mp4 or anything PyAV decodes)."""
    frames = read_video(path).frames  # [F, H, W, 3] in 0..1
    return judge_video(frames.permute(3, 0, 1, 2) * 2 - 1)


def continuity(video: torch.Tensor, join: int) -> Continuity:
    """Does the motion before pixel frame `join` carry on after it, in the same direction and without a jump?

    Both halves are judged against the background of the whole clip, so a background that changes at the join
    shows up as a lost object rather than being silently re-estimated.
    """
    frames = video.shape[1]
    if not 2 <= join <= frames - 2:
        raise InputError(f"join={join} leaves fewer than 2 frames on one side of a {frames}-frame clip")
    rgb = _rgb(video)
    background = background_color(rgb)
    before, track_before = _judge_rgb(rgb[:, :join], background)
    after, track_after = _judge_rgb(rgb[:, join:], background)
    last, first = track_before[-1], track_after[0]
    jump = float((first - last).norm()) if not (last.isnan().any() or first.isnan().any()) else math.inf
    step = math.hypot(*before.displacement) / max(join - 1, 1)
    limit = JUMP_STEPS * step + JUMP_FRACTION * min(video.shape[2:])
    continues = before.direction is not None and after.direction == before.direction and jump <= limit
    return Continuity(before=before, after=after, jump=jump, limit=limit, continues=continues)
