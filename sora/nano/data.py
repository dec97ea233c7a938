"""Synthetic clips for the nano model: one flat shape in a named colour moving in a named direction.

A clip is a pure function of its seed (and of the attributes a caller pins): the scene (colour, shape, size,
background, direction, speed, start position) is drawn with `random.Random(seed)`, rendered with anti-aliased
edges, and captioned with phrases from `vocabulary`. The object crosses the frame near its middle line and stays
fully inside the frame for the whole clip whenever its path fits, so direction of motion is never ambiguous.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from ..errors import InputError
from . import vocabulary as vocab

# Motion per frame as a fraction of the shorter side; over 32 frames: 38%, 54% and 70% of the frame. Strong
# motion makes direction, the hardest thing for a small model to learn, unmistakable in every clip.
SPEED_FRACTION: dict[str, float] = {"slow": 0.012, "normal": 0.017, "fast": 0.022}
# half-size of the object (circle radius, half the square's side) as a fraction of the shorter side
SIZE_FRACTION: dict[str, float] = {"small": 0.07, "medium": 0.10, "large": 0.13}
# object/background pairs closer than this in RGB (0..1) are never drawn: white on light is barely visible
MIN_CONTRAST = 0.35
MARGIN = 1.0  # pixels kept free between the object and the frame edge
# Across its motion the object keeps to the middle of the frame, within this fraction of the shorter side. With
# the object anywhere across the frame, what a caption says about a clip's pixels at high noise is a faint band
# (where "right" and "left" differ by a fifth of the variance of the clip; measured on object masks), and a model
# sampling from text alone set the direction from the noise (text-to-video direction 0.34 against image-to-video
# 0.84). Kept to a lane, the words fix where the object is in every frame up to its speed and start.
LANE_FRACTION = 0.08


@dataclass(frozen=True)
class Scene:
    """What one clip shows. Positions are in pixels, x to the right, y downward, pixel centres at +0.5."""

    color: str
    shape: str
    size: str
    background: str
    direction: str
    speed: str
    start: tuple[float, float]  # object centre (x, y) at frame 0
    step: tuple[float, float]  # motion (dx, dy) per frame
    radius: float  # half-size in pixels

    def centre(self, frame: float) -> tuple[float, float]:
        return self.start[0] + self.step[0] * frame, self.start[1] + self.step[1] * frame


@dataclass(frozen=True)
class Clip:
    video: torch.Tensor  # [3, F, H, W] float32 in -1..1
    caption: str
    scene: Scene


def contrast(color: str, background: str) -> float:
    """Euclidean RGB distance (0..1 channels) between a vocabulary colour and a background."""
    a, b = vocab.ALL_COLORS[color], vocab.BACKGROUNDS[background]
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


def check_frames(frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        lower = max(1, 1 + 4 * ((frames - 1) // 4))
        raise InputError(f"frames={frames} is not of the form 1 + 4k; use {lower} or {lower + 4}")


def _pick(rng: random.Random, table: dict, pinned: str | None, what: str, extra: dict | None = None) -> str:
    """`pinned` (a key of `table` or `extra`), or a key of `table` drawn with `rng` when it is None."""
    if pinned is None:
        return rng.choice(sorted(table))
    if pinned not in table and pinned not in (extra or {}):
        raise InputError(f"unknown {what} {pinned!r}; choose one of {', '.join(sorted([*table, *(extra or {})]))}")
    return pinned


def _start_along(rng: random.Random, length: float, radius: float, travel: float) -> float:
    """Centre coordinate at frame 0 along the motion axis, moving toward +; travel = distance covered."""
    low, high = radius + MARGIN, length - radius - MARGIN - travel
    if high < low:  # the path does not fit: centre it, so the object leaves the frame equally at both ends
        return (length - travel) / 2
    return rng.uniform(low, high)


def sample_scene(rng: random.Random, frames: int, height: int, width: int, *, color: str | None = None,
                 shape: str | None = None, size: str | None = None, background: str | None = None,
                 direction: str | None = None, speed: str | None = None) -> Scene:
    """Draw a scene; pinned attributes are kept, the others drawn from the vocabulary. A colour of
    `vocab.EXTRA_COLORS` is drawn only when pinned."""
    color = _pick(rng, vocab.COLORS, color, "colour", vocab.EXTRA_COLORS)
    shape = _pick(rng, vocab.SHAPES, shape, "shape")
    size = _pick(rng, vocab.SIZES, size, "size")
    direction = _pick(rng, vocab.DIRECTIONS, direction, "direction")
    speed = _pick(rng, vocab.SPEEDS, speed, "speed")
    if background is None:
        background = rng.choice([b for b in sorted(vocab.BACKGROUNDS) if contrast(color, b) >= MIN_CONTRAST])
    else:
        background = _pick(rng, vocab.BACKGROUNDS, background, "background")
        if contrast(color, background) < MIN_CONTRAST:
            raise InputError(f"a {color} object on the {background} background is too faint to see; "
                             f"pick another background or colour")

    side = min(height, width)
    radius = SIZE_FRACTION[size] * side
    per_frame = SPEED_FRACTION[speed] * side
    travel = per_frame * (frames - 1)
    ux, uy = vocab.DIRECTIONS[direction]
    if ux:
        x = _start_along(rng, width, radius, travel)
        x = x if ux > 0 else width - x
        y = height / 2 + rng.uniform(-1, 1) * LANE_FRACTION * side
    else:
        y = _start_along(rng, height, radius, travel)
        y = y if uy > 0 else height - y
        x = width / 2 + rng.uniform(-1, 1) * LANE_FRACTION * side
    return Scene(color=color, shape=shape, size=size, background=background, direction=direction, speed=speed,
                 start=(x, y), step=(ux * per_frame, uy * per_frame), radius=radius)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def write_caption(scene: Scene, rng: random.Random) -> str:
    """A caption in vocabulary phrases, e.g. "a small blue square quickly drifting upward on a dark background".

    Colour, shape and direction are always named; size, speed and background are named most of the time, so
    the model also learns to follow prompts that leave them out.
    """
    size_word = rng.choice(vocab.SIZES[scene.size]) if rng.random() < 0.7 else ""
    speed_word = rng.choice(vocab.SPEEDS[scene.speed]) if rng.random() < 0.7 else ""
    noun = rng.choice(vocab.SHAPES[scene.shape])
    motion = rng.choice(vocab.DIRECTION_PHRASES[scene.direction])
    words = [w for w in (size_word, scene.color, noun, speed_word, motion) if w]
    if rng.random() < 0.5:
        words.append(rng.choice(vocab.BACKGROUND_PHRASES[scene.background]))
    return " ".join([_article(words[0])] + words)


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    """Distance in pixels outside (>0) or inside (<0) the shape, from offsets to its centre."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - radius
    # triangle: apex up at (0, -r), base from (-r, r) to (r, r); intersection of three half-planes
    slant = (2 * dx.abs() - (dy + radius)) / 5 ** 0.5
    return torch.maximum(dy - radius, slant)


def render(scene: Scene, frames: int, height: int, width: int) -> torch.Tensor:
    """The scene as video [3, F, H, W] in -1..1, object edges anti-aliased over one pixel."""
    t = torch.arange(frames, dtype=torch.float32)
    cx = (scene.start[0] + scene.step[0] * t).view(frames, 1, 1)
    cy = (scene.start[1] + scene.step[1] * t).view(frames, 1, 1)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5).view(1, 1, width)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5).view(1, height, 1)
    coverage = (0.5 - _signed_distance(scene.shape, xs - cx, ys - cy, scene.radius)).clamp(0, 1)  # [F, H, W]
    fg = torch.tensor(vocab.ALL_COLORS[scene.color], dtype=torch.float32).view(3, 1, 1, 1)
    bg = torch.tensor(vocab.BACKGROUNDS[scene.background], dtype=torch.float32).view(3, 1, 1, 1)
    rgb = bg + (fg - bg) * coverage.unsqueeze(0)  # [3, F, H, W] in 0..1
    return rgb * 2 - 1


def object_pixels(clip: Clip) -> torch.Tensor:
    """[F, H, W] float: 1 where a pixel shows any of the object (its anti-aliased edge included), else 0."""
    background = torch.tensor(vocab.BACKGROUNDS[clip.scene.background]).view(3, 1, 1, 1) * 2 - 1
    return ((clip.video - background).abs().amax(dim=0) > 1e-3).float()


def make_clip(seed: int, frames: int = 33, height: int = 64, width: int = 64, **pinned: str) -> Clip:
    """The clip of `seed`: video [3, F, H, W] in -1..1 with its caption and scene.

    `pinned` fixes attributes by name (color, shape, size, background, direction, speed; color may also be one of
    `vocab.EXTRA_COLORS`); the rest come from the seed. The same arguments always give the same clip.
    """
    check_frames(frames)
    if height < 16 or width < 16:
        raise InputError(f"clip size {width}x{height} is too small; use at least 16x16 pixels")
    rng = random.Random(seed)
    scene = sample_scene(rng, frames, height, width, **pinned)
    return Clip(video=render(scene, frames, height, width), caption=write_caption(scene, rng), scene=scene)


def centred_first_frame(seed: int, height: int = 64, width: int = 64, **pinned: str) -> tuple[torch.Tensor, Scene]:
    """The first frame [3, 1, H, W] of the clip of `seed` with its object moved to the middle, where it has room to
    go in any direction (for asking one image to move every way), and that scene."""
    scene = dataclasses.replace(make_clip(seed, 1, height, width, **pinned).scene, start=(width / 2, height / 2))
    return render(scene, 1, height, width), scene
