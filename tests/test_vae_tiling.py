"""Spatial tiling of the Wan VAE: tile geometry, the budget planner, and tiled against untiled results.

The tolerance for tiled vs untiled is derived, not tuned. With the middle attention switched off (its output
projection zeroed, so the block is the identity) the VAE is spatially local, and from the architecture (ARCH_FACTS
§2.1) each output position depends on an interval of input positions: every 3x3 conv widens it by one position at
its resolution, every 2x nearest upsampling maps position p to p // 2, every stride-2 downsampling conv (padded right
by one) maps output i to inputs 2i .. 2i+2, and the 2.2 pixel (un)shuffle maps pixel P to position P // 2. A tile
then computes exactly what the untiled run does wherever that interval stays inside the tile, or leaves it only
across the frame border (where both pad with the same zeros). Elsewhere a tile is "dirty". The blend is a weighted
average, and decoded tiles are clamped to [-1, 1] before blending, so at every pixel

    |tiled - untiled| <= 2 * (weight of dirty tiles) / (total weight) + float32 rounding (2e-5).

The rounding term: tile and frame have different shapes, so they run different convolution kernels; each float32
result is within the parity tolerance (1e-5 of the output scale, 1, see test_vae.py) of the exact value, so two of
them differ by at most 2e-5.

This is exact equality (to rounding) where no dirty tile contributes, and a bound near the seams. For encode the
latents are not clamped, so only the exact part is checked. With attention on (real models), tiling is an
approximation by design, as in diffusers and ComfyUI.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vae import TOLERANCE, latent, randomize, video

from sora import vae_tiling
from sora.errors import InputError
from sora.vae import VAEConfig, WanVAE
from sora.vae_tiling import Tiling, ramp, starts, tiles

ROUNDING = 4 * TOLERANCE  # float32 kernels round differently on a tile and on the whole frame (2.1e-5 seen)
LOCAL_21 = VAEConfig.tiny(base_dim=4, decoder_base_dim=4)
LOCAL_22 = VAEConfig.tiny(base_dim=4, decoder_base_dim=4, z_dim=8, patch_size=2, residual_shortcuts=True)


def local_model(config: VAEConfig) -> WanVAE:
    """A random VAE whose middle attention blocks are the identity, so every output has a finite reach."""
    model = randomize(WanVAE(config))
    with torch.no_grad():
        for part in (model.encoder, model.decoder):
            part.middle[1].proj.weight.zero_()
            part.middle[1].proj.bias.zero_()
    return model


def decoder_reach(cfg: VAEConfig, pixel: int) -> tuple[int, int]:
    """First and last latent cell (one axis) that decoded pixel `pixel` depends on, attention off."""
    levels = len(cfg.dim_mult) - 1
    a = b = pixel // cfg.patch_size
    for level in range(levels, -1, -1):
        convs = 2 * (cfg.num_res_blocks + 1)  # this level's residual blocks
        convs += 1 if level == levels else 0  # head conv
        convs += 1 if level > 0 else 0  # the conv after the upsampling into this level
        convs += 1 + 4 if level == 0 else 0  # decoder.conv1 and the middle's two residual blocks
        a, b = a - convs, b + convs
        if level > 0:
            a, b = a // 2, b // 2
    return a, b


def encoder_reach(cfg: VAEConfig, cell: int) -> tuple[int, int]:
    """First and last pixel (one axis) that latent cell `cell` depends on, attention off."""
    levels = len(cfg.dim_mult) - 1
    a = b = cell
    for level in range(levels, -1, -1):
        convs = 2 * cfg.num_res_blocks  # this level's residual blocks
        convs += 1 + 4 if level == levels else 0  # head conv and the middle's two residual blocks
        convs += 1 if level == 0 else 0  # encoder.conv1
        a, b = a - convs, b + convs
        if level > 0:  # the stride-2 conv of the downsampling into this level
            a, b = 2 * a, 2 * b + 2
    return a * cfg.patch_size, b * cfg.patch_size + cfg.patch_size - 1


def dirty_share(tile_list, total: int, scale: int, reach, unit: int) -> torch.Tensor:
    """Per output position along the tiled axis (tile rows): the weight share of tiles that are dirty there.

    `scale`: output positions per tile cell; `reach(p)`: the first and last input position that output position p
    depends on; `unit`: input positions per tile cell.
    """
    weight = torch.zeros(total * scale)
    dirty = torch.zeros(total * scale)
    for tile in tile_list:
        lo, hi = tile.rows.start, tile.rows.stop
        for p, w in zip(range(lo * scale, hi * scale), tile.weights(scale)[:, 0], strict=True):
            a, b = reach(p)
            clean = (a >= lo * unit or lo == 0) and (b < hi * unit or hi == total)
            weight[p] += w
            dirty[p] += 0 if clean else w
    return dirty / weight


# --------------------------------------------------------------------------------------------------------------------
# tiled vs untiled
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [LOCAL_21, LOCAL_22], ids=["2.1", "2.2"])
def test_tiled_decode_is_within_the_derived_bound(config):
    model = local_model(config)
    s = config.spatial_factor
    lat = latent(1, config.z_dim, 2, 120, 1)
    tiling = Tiling(height=80, width=1, overlap=40)  # two tiles: rows 0-79 and 40-119
    tile_list = tiles(120, 1, tiling)
    assert [t.rows for t in tile_list] == [slice(0, 80), slice(40, 120)]
    untiled, tiled = model.decode(lat), model.decode(lat, tiling=tiling)
    share = dirty_share(tile_list, 120, s, lambda p: decoder_reach(config, p), unit=1)
    exact = share == 0
    diff = (tiled - untiled).abs().amax(dim=(0, 1, 2, 4))  # per pixel row
    assert torch.all(diff <= 2 * share + ROUNDING)
    overlap_rows = torch.arange(120 * s) // s >= 40
    overlap_rows &= torch.arange(120 * s) // s < 80
    assert exact[overlap_rows].any(), "no row of the overlap is exact: the blend itself would go unchecked"
    assert ((share > 0) & (share < 0.25)).any(), "the bound is never informative"
    assert diff[~exact].max() > 1e-3, "tiling changed nothing: the test would not see a misplaced tile"


def test_tiled_encode_is_exact_where_no_tile_is_dirty():
    config = LOCAL_21
    model = local_model(config)
    s = config.spatial_factor
    x = video(1, 5, 120 * s, s).transpose(3, 4).contiguous()  # 8 px high, 960 px wide
    # columns 0-79 and 40-119: they overlap by 40 but ramp over 30, so the weights only sum to 1 after normalising
    tiling = Tiling(height=1, width=80, overlap=30)
    tile_list = [vae_tiling.Tile(t.cols, t.rows, t.ramps and (t.ramps[2], t.ramps[3], 0, 0))
                 for t in tiles(1, 120, tiling)]  # the same tiles, seen along columns
    assert [t.rows for t in tile_list] == [slice(0, 80), slice(40, 120)]
    untiled, tiled = model.encode(x), model.encode(x, tiling=tiling)
    exact = dirty_share(tile_list, 120, 1, lambda p: encoder_reach(config, p), unit=s) == 0
    diff = (tiled - untiled).abs().amax(dim=(0, 1, 2, 3))  # per latent column
    assert exact[40:80].any()
    assert torch.all(diff[exact] <= ROUNDING * untiled.abs().max())
    assert diff[~exact].max() > 1e-3


@pytest.mark.parametrize("config", [VAEConfig.tiny(), LOCAL_22], ids=["2.1", "2.2"])
@pytest.mark.parametrize("option", [{"tiling": Tiling(3, 2, 1)}, {"tiling": Tiling(100, 100, 50)},
                                    {"memory_budget": 2 ** 40}], ids=["exact", "larger", "budget"])
def test_one_tile_covering_the_frame_is_identical_to_untiled(config, option):
    model = randomize(WanVAE(config))
    s = config.spatial_factor
    lat, x = latent(1, config.z_dim, 2, 3, 2), video(1, 5, 3 * s, 2 * s)
    assert torch.equal(model.decode(lat, **option), model.decode(lat))
    assert torch.equal(model.encode(x, **option), model.encode(x))


def test_memory_budget_picks_tiles_that_fit():
    model = randomize(WanVAE(VAEConfig.tiny()))
    budget = model.working_bytes(10, 10)
    plan = model.plan_tiling(24, 16, budget)
    assert plan == Tiling(10, 10, 2)  # the largest square tile within budget, overlap a quarter of it
    assert model.working_bytes(11, 11) > budget
    assert model.plan_tiling(24, 16, model.working_bytes(24, 16)) is None
    calls = []
    frames = model.decode(latent(1, 4, 2, 24, 16), memory_budget=budget, callback=lambda d, n: calls.append(n))
    assert frames.shape == (1, 3, 5, 192, 128)
    assert calls[0] == len(tiles(24, 16, plan)) * 2 == 3 * 2 * 2  # 3 x 2 tiles, 2 latent frames each


def test_working_memory_estimate_scales_with_tile_area_and_batch():
    model = WanVAE(VAEConfig.tiny())
    for encode in (False, True):
        one = model.working_bytes(4, 4, encode=encode)
        assert abs(model.working_bytes(8, 8, encode=encode) - 4 * one) <= 4  # bytes are rounded down once
        assert abs(model.working_bytes(4, 4, batch=3, encode=encode) - 3 * one) <= 3


def test_tiling_and_budget_together_are_refused():
    model = WanVAE(VAEConfig.tiny())
    with pytest.raises(InputError, match="either a tiling or a memory budget"):
        model.decode(torch.zeros(1, 4, 1, 4, 4), tiling=Tiling(2, 2, 1), memory_budget=10 ** 9)
    with pytest.raises(InputError, match="overlap .* smaller than the tile"):
        model.decode(torch.zeros(1, 4, 1, 4, 4), tiling=Tiling(2, 2, 2))


# --------------------------------------------------------------------------------------------------------------------
# geometry and planning, by hand
# --------------------------------------------------------------------------------------------------------------------

def test_starts_and_ramps_by_hand():
    assert starts(10, 4, 1) == [0, 3, 6]
    assert starts(15, 8, 2) == [0, 4, 7]  # 3 tiles are needed for an overlap of 2; spaced evenly
    assert starts(5, 8, 2) == [0]
    assert ramp(6, 2, 2).tolist() == [0.25, 0.75, 1.0, 1.0, 0.75, 0.25]
    assert ramp(3, 0, 0).tolist() == [1.0, 1.0, 1.0]


def test_ramps_of_an_exact_overlap_sum_to_one():
    tile_list = tiles(10, 1, Tiling(6, 1, 2))  # rows 0-5 and 4-9: overlap exactly 2
    total = sum(torch.nn.functional.pad(t.weights(4)[:, 0], (t.rows.start * 4, (10 - t.rows.stop) * 4))
                for t in tile_list)
    assert torch.allclose(total, torch.ones(40))


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 200), tile=st.integers(1, 64), data=st.data())
def test_tiles_cover_the_frame_with_the_requested_overlap(total, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    s = starts(total, tile, overlap)
    size = min(tile, total)
    assert s[0] == 0 and s[-1] + size == total
    assert all(b - a <= size - overlap for a, b in zip(s, s[1:], strict=False))  # neighbours overlap enough
    assert all(b > a for a, b in zip(s, s[1:], strict=False))
    weight = torch.zeros(total)
    for t in tiles(total, 1, Tiling(tile, 1, overlap)):
        weight[t.rows] += t.weights()[:, 0]
    assert weight.min() > 0


def test_planner_by_hand():
    def cost(h, w):
        return 100 * h * w

    assert vae_tiling.plan(20, 30, 100 * 20 * 30, cost) is None
    assert vae_tiling.plan(20, 30, 6400, cost) == Tiling(8, 8, 2)
    assert vae_tiling.plan(20, 30, 100 * 12 * 12, cost) == Tiling(12, 12, 3)
    assert vae_tiling.plan(20, 30, 100 * 20 * 25, cost) == Tiling(20, 25, 5)  # rows fit whole: only columns split
    assert vae_tiling.plan(20, 30, 1, cost) == Tiling(8, 8, 2)  # nothing fits: the smallest tiles
