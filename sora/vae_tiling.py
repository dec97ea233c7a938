"""Spatial tiles for the video VAE: where they go, how they are blended, and how large they may be for a budget.

A frame of h x w latent cells is covered by overlapping tiles of at most `Tiling.height` x `Tiling.width` cells,
spaced evenly so that neighbours overlap by at least `Tiling.overlap` cells. Each tile is encoded or decoded on its
own, over all frames, and written into the preallocated output with a weight that ramps linearly from near 0 to 1
over `overlap` cells at every edge it shares with another tile (full weight at the frame border); the output is
finally divided by the sum of the weights. Where two ramps overlap exactly they sum to 1, so the blend is a plain
cross-fade. One tile covering the frame gets no weights at all: the result is bit-identical to untiled.

Tiling is exact only for a spatially local network: Wan's middle attention sees the whole tile, and convolutions
near a cut edge see zeros instead of the neighbouring pixels, so seams are hidden by the cross-fade, not removed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InputError

MIN_TILE = 8  # latent cells; smaller tiles spend most of their area in the blended borders

# Working memory beyond the causal caches, in tensors the size of the widest activation. Measured as live memory
# (peak RSS with glibc's mmap threshold pinned, torch 2.13 CPU float32, `python benchmarks/vae_decode.py
# --check-estimate`): 2.1 decode 3.1-3.3 (widths 16 to 96), 2.2 decode 5.6, 2.1 encode 6.0-6.5, 2.2 encode 8.5;
# rounded up by about 10%. A layer visibly holds 3-4 such tensors (input, padded input, output, shortcut); oneDNN's
# reordered copies, the chunk's input and the 2.2 shortcut stages make up the rest.
ACTIVATION_COPIES = {  # (encode, 2.2 layout) -> copies
    (False, False): 3.6, (False, True): 6.2, (True, False): 7.1, (True, True): 9.3}
# The above is live memory. Allocators keep freed blocks for reuse (glibc's heap, CUDA's caching allocator), so a
# process holds more: with glibc's default settings, peak RSS in the decode benchmark is 1.35-1.65x the live peak.
# The estimate adds a quarter; the memory manager's out-of-memory retry with smaller tiles covers the rest.
ALLOCATOR_HEADROOM = 1.25


@dataclass(frozen=True)
class Tiling:
    """Tiles of `height` x `width` latent cells whose neighbours overlap by at least `overlap` cells."""

    height: int
    width: int
    overlap: int

    def __post_init__(self):
        if min(self.height, self.width) < 1 or self.overlap < 0:
            raise InputError(f"tiles need a size of at least 1 latent cell and an overlap >= 0; got {self}")


def starts(total: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile starts along one axis of `total` cells, neighbours overlapping by >= `overlap`."""
    if tile >= total:
        return [0]
    count = math.ceil((total - overlap) / (tile - overlap))
    return [round(i * (total - tile) / (count - 1)) for i in range(count)]


def ramp(length: int, ramp_in: int, ramp_out: int) -> torch.Tensor:
    """Weights along one tile axis: rising over the first `ramp_in` positions, falling over the last `ramp_out`.

    Position k of a ramp of n gets (k + 0.5) / n, so two complementary ramps sum to exactly 1 and no weight is 0.
    """
    w = torch.ones(length)
    if ramp_in:
        w[:ramp_in] = (torch.arange(ramp_in) + 0.5) / ramp_in
    if ramp_out:
        w[length - ramp_out:] = torch.minimum(w[length - ramp_out:], (torch.arange(ramp_out).flip(0) + 0.5) / ramp_out)
    return w


@dataclass(frozen=True)
class Tile:
    """One tile: latent rows and columns, and the overlap (cells) its weights ramp over at each shared edge."""

    rows: slice
    cols: slice
    ramps: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) ramp lengths; None: the only tile

    def weights(self, scale: int = 1) -> torch.Tensor:
        """Blend weights [rows*scale, cols*scale] (scale: pixels per latent cell); all ones for the only tile."""
        top, bottom, left, right = (r * scale for r in self.ramps or (0, 0, 0, 0))
        h = ramp((self.rows.stop - self.rows.start) * scale, top, bottom)
        w = ramp((self.cols.stop - self.cols.start) * scale, left, right)
        return h[:, None] * w[None, :]

    def region(self, scale: int = 1) -> tuple[slice, slice]:
        return (slice(self.rows.start * scale, self.rows.stop * scale),
                slice(self.cols.start * scale, self.cols.stop * scale))

    def write(self, out: torch.Tensor, values: torch.Tensor, scale: int = 1) -> None:
        """Put this tile's `values` [..., rows*scale, cols*scale] into `out` [..., H, W]: copied when it is the
        only tile, else added with its blend weights (see `normalize_blend`)."""
        rows, cols = self.region(scale)
        if self.ramps is None:
            out[..., rows, cols] = values
        else:
            out[..., rows, cols] += (values * self.weights(scale).to(values.device)).to(out.device)


def tiles(height: int, width: int, tiling: Tiling | None) -> list[Tile]:
    """The tiles covering a `height` x `width` latent frame, row by row; one unweighted tile when it fits."""
    if tiling is None or (tiling.height >= height and tiling.width >= width):
        return [Tile(slice(0, height), slice(0, width))]
    th, tw, o = min(tiling.height, height), min(tiling.width, width), tiling.overlap
    for tile, total in ((th, height), (tw, width)):
        if tile < total and o >= tile:
            raise InputError(f"the tile overlap ({o} cells) must be smaller than the tile ({tile} cells); "
                             "lower the overlap or enlarge the tiles")
    result = []
    for y in starts(height, th, o):
        for x in starts(width, tw, o):
            result.append(Tile(slice(y, y + th), slice(x, x + tw),
                               (o if y > 0 else 0, o if y + th < height else 0,
                                o if x > 0 else 0, o if x + tw < width else 0)))
    return result


def normalize_blend(out: torch.Tensor, tile_list: list[Tile], scale: int = 1) -> None:
    """Divide the weighted sums that `Tile.write` accumulated in `out` [..., H, W] by the summed weights, in place."""
    if len(tile_list) == 1 and tile_list[0].ramps is None:
        return
    total = torch.zeros(out.shape[-2:], device=out.device)
    for tile in tile_list:
        rows, cols = tile.region(scale)
        total[rows, cols] += tile.weights(scale).to(out.device)
    out /= total


def plan(height: int, width: int, budget: int, cost: Callable[[int, int], int]) -> Tiling | None:
    """The largest square-ish tiling whose `cost(tile_h, tile_w)` (bytes) fits `budget`; None if the frame fits.

    Tiles shrink from the frame size down to `MIN_TILE` cells; if even that does not fit, the smallest tiling is
    returned (working memory cannot go lower, and the caller's out-of-memory handling takes over).
    Overlap: a quarter of the tile side, at least 1 cell.
    """
    if cost(height, width) <= budget:
        return None
    side = max(height, width)
    while side > MIN_TILE and cost(min(height, side), min(width, side)) > budget:
        side -= 1
    side = max(side, 1)
    th, tw = min(height, side), min(width, side)
    overlap = max(1, min(th, tw) // 4) if min(th, tw) > 1 else 0
    return Tiling(th, tw, overlap)


def estimate_working_bytes(cached: float, widest: float, height: int, width: int, *, batch: int = 1,
                           itemsize: int = 4, copies: float) -> int:
    """Estimated peak working memory of one chunk of a `height` x `width` latent-cell tile, weights excluded.

    cached, widest: values per latent cell of the causal cache and of the widest tensor of a chunk, read off the
    VAE's own modules (`sora.vae.footprint`); copies: how many tensors as wide as the widest are alive at the
    peak (`ACTIVATION_COPIES`, calibrated against measured peaks). Times `ALLOCATOR_HEADROOM`.
    """
    return int(ALLOCATOR_HEADROOM * itemsize * height * width * batch * (cached + copies * widest))
