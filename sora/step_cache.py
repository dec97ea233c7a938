"""Step caches: skip the transformer on sampling steps where its input has barely changed since the last step.

A 50-step guided clip costs 100 forwards, and between neighbouring steps the blocks change the tokens by almost the
same amount. A step cache measures how much the input moved since the last computed step and, while the summed
change stays under a threshold, adds the change stored from that step instead of running the blocks. Three rules
(ECOSYSTEM_FACTS §4; the facts carry over, the code is our own):

- **teacache** (ali-vilab/TeaCache): the relative L1 change of the timestep-modulated input, accumulated. For the
  Wan 2.1 models with published coefficients (T2V 1.3B and 14B, I2V 480P and 720P) the indicator is the projected
  timestep embedding `e0`, its change rescaled by the published 4th-order polynomial; for every other model it is
  the first block's modulated input `LN(x)·(1 + scale) + shift` (scale and shift from `e0`, without the block's
  own modulation table, which block streaming keeps off the device), its raw change accumulated.
- **magcache** (Zehong-Ma/MagCache): the block-stack residual's magnitude ratio between consecutive steps,
  measured once per model (`calibrate`) or taken from the published tables (Wan 2.1 T2V 1.3B / 14B, I2V 480P /
  720P, VACE 1.3B); the error `Σ |1 − Π ratio|` is accumulated, at most `max_skips` steps in a row are skipped.
- **easycache** (H-EmbodVis/EasyCache): no calibration. The model's whole output is predicted from its input:
  `k = |Δ output| / |Δ input|` between the last two computed steps, the relative output change `k·|Δ input| /
  |output|` is accumulated, and a skipped step returns `input + (output − input)` of the last computed step
  (the whole forward is skipped, embedding and head included).

teacache and magcache plug into the DiT's block-stack hook (`WanDiT.forward(blocks=...)`): the embeddings and the
head always run and the cached residual is `tokens after the blocks − tokens before`. easycache wraps the whole
call. All three keep **separate state per guidance pass** (the batch chunks `ModelCall.passes` names, or one call
per pass), and a wrapper belongs to one model handle, so the two experts of Wan 2.2 A14B each have their own.
A batched call skips only when every pass in it would; otherwise all of them run and refresh their state.

Skipping is allowed only on steps `start·steps ≤ step < end·steps`, never on the first or the last step; with
threshold 0 nothing is ever skipped and the output is that of the plain model bit for bit. When a run ends the
sampler calls `end_run`, which reports what was skipped (the log and an optional `report` callback) and forgets
the run's state.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import InputError
from .handle import ModelCall, ModelHandle

log = logging.getLogger(__name__)

METHODS = ("teacache", "magcache", "easycache")
# Thresholds that keep nano's judge accuracy and 30+ dB against the plain run at 20 and 50 steps, start 0.2
# (benchmarks/speed.py); the sources' own picks for the Wan models are in ECOSYSTEM_FACTS §4 (TeaCache 1.3B
# 0.05-0.10 in e0 mode, MagCache 0.12-0.24, EasyCache 0.05).
DEFAULT_THRESHOLDS = {"teacache": 0.2, "magcache": 0.12, "easycache": 0.1}
DEFAULT_MAX_SKIPS = {"magcache": 4}  # MagCache's K, as its T2V-1.3B recipe (its CLI default is 2, 14B uses 6)
RATIOS_SUFFIX = ".magcache.json"  # a model's measured magnitude ratios live beside its file: <file>.magcache.json
RATIOS_FORMAT = "sora.magcache/1"


@dataclass(frozen=True)
class CacheSettings:
    """How a step cache decides.

    method: one of METHODS. threshold: the accumulated change under which a step is skipped (0: never skip).
    start, end: the fraction of the steps during which skipping is allowed (`start·steps ≤ step < end·steps`;
        the first and the last step always run). max_skips: most steps in a row one pass may skip (0 = no limit;
        None = the method's default, DEFAULT_MAX_SKIPS). calibrate: magcache only: skip nothing and measure the
        model's magnitude ratios.
    """
    method: str = "easycache"
    threshold: float = DEFAULT_THRESHOLDS["easycache"]
    start: float = 0.2
    end: float = 1.0
    max_skips: int | None = None
    calibrate: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"step cache method {self.method!r} is not one of {METHODS}")
        if self.max_skips is None:
            object.__setattr__(self, "max_skips", DEFAULT_MAX_SKIPS.get(self.method, 0))
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise InputError(f"step cache threshold must be 0 or more, got {self.threshold}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise InputError(f"step cache start {self.start} and end {self.end} must satisfy 0 <= start <= end <= 1")
        if self.max_skips < 0:
            raise InputError(f"max_skips must be 0 (no limit) or more, got {self.max_skips}")
        if self.calibrate and self.method != "magcache":
            raise InputError("calibrate measures MagCache's magnitude ratios; use it with method 'magcache'")

    def may_skip(self, step: int, steps: int) -> bool:
        """Whether `step` (0-based, of `steps`) lies in the skipping window; never the first or the last step."""
        return 0 < step < steps - 1 and self.start * steps <= step < self.end * steps


# ---------------------------------------------------------------------------------------------------------------
# Published tables (ECOSYSTEM_FACTS §4.1, §4.2)
# ---------------------------------------------------------------------------------------------------------------

# TeaCache4Wan2.1, e0 mode (use_ret_steps=True): the polynomial's coefficients, highest degree first.
TEACACHE_COEFFICIENTS = {
    "wan21_t2v_1.3b": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    "wan21_t2v_14b": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    "wan21_i2v_480p": (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
    "wan21_i2v_720p": (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
}

# MagCache4Wan2.1: per-step magnitude ratios, interleaved (cond, uncond), the first pair padding; T2V tables for 50
# steps, I2V for 40.
_MAG_T2V_1_3B = (
    1.0, 1.0, 1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567,
    0.99586, 0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552,
    0.99549, 0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481,
    0.99479, 0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309,
    0.99304, 0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005,
    0.99003, 0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836,
    0.98359, 0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002, 0.96538,
    0.96541, 0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821,
    0.86868, 0.81838, 0.81939)
_MAG_T2V_14B = (
    1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658, 0.99482,
    0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468, 0.99465, 0.99438,
    0.99434, 0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428,
    0.99426, 0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218,
    0.99215, 0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887,
    0.98866, 0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177,
    0.98173, 0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349,
    0.96345, 0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796,
    0.87945, 0.86111, 0.86189)
_MAG_I2V_480P = (
    1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878, 0.98762,
    0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065, 0.99068, 0.98845,
    0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823, 0.98756, 0.98759, 0.98808,
    0.98814, 0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952,
    0.97953, 0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056,
    0.97055, 0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217,
    0.93224, 0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616)
_MAG_I2V_720P = (
    1.0, 1.0, 0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917, 0.98646,
    0.98652, 0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215, 0.99212, 0.99515,
    0.99515, 0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169, 0.99041, 0.99042, 0.99201,
    0.99198, 0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718,
    0.98719, 0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498,
    0.97499, 0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397,
    0.93414, 0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768)
_MAG_VACE_1_3B = (
    1.0, 1.0, 1.00129, 1.0019, 1.00056, 1.00053, 0.99776, 0.99746, 0.99726, 0.99789, 0.99725, 0.99785, 0.9958,
    0.99625, 0.99703, 0.99728, 0.99863, 0.9988, 0.99735, 0.99731, 0.99714, 0.99707, 0.99697, 0.99687, 0.9969,
    0.99683, 0.99695, 0.99702, 0.99697, 0.99701, 0.99608, 0.99617, 0.99721, 0.9973, 0.99649, 0.99657, 0.99659,
    0.99667, 0.99727, 0.99731, 0.99603, 0.99612, 0.99652, 0.99659, 0.99635, 0.9964, 0.9958, 0.99585, 0.99581,
    0.99585, 0.99573, 0.99579, 0.99531, 0.99534, 0.99505, 0.99508, 0.99481, 0.99484, 0.99426, 0.99433, 0.99403,
    0.99406, 0.99357, 0.9936, 0.99302, 0.99305, 0.99243, 0.99247, 0.9916, 0.99164, 0.99085, 0.99087, 0.98985,
    0.9899, 0.98857, 0.98859, 0.98717, 0.98721, 0.98551, 0.98556, 0.98301, 0.98305, 0.9805, 0.98055, 0.97635,
    0.97641, 0.97183, 0.97187, 0.96496, 0.965, 0.95526, 0.95533, 0.94102, 0.94104, 0.91809, 0.91815, 0.87871,
    0.87879, 0.80141, 0.80164)
MAGCACHE_RATIOS = {"wan21_t2v_1.3b": _MAG_T2V_1_3B, "wan21_t2v_14b": _MAG_T2V_14B, "wan21_i2v_480p": _MAG_I2V_480P,
                   "wan21_i2v_720p": _MAG_I2V_720P, "wan21_vace_1.3b": _MAG_VACE_1_3B,
                   "wan21_vace_14b": _MAG_T2V_14B}  # MagCache uses the T2V-14B table for VACE-14B


def published_model(handle: ModelHandle) -> str | None:
    """The key of `handle`'s model in the published tables (TEACACHE_COEFFICIENTS, MAGCACHE_RATIOS), or None."""
    task, dim = handle.task, getattr(handle.config, "dim", None)
    size = {1536: "1.3b", 5120: "14b"}.get(dim)
    if task in ("wan21_t2v", "wan21_vace") and size is not None:
        return f"{task}_{size}"
    if task in ("wan21_i2v_480p", "wan21_i2v_720p"):
        return task
    return None


# ---------------------------------------------------------------------------------------------------------------
# MagCache's magnitude ratios: a table per guidance pass, measured or published
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MagnitudeRatios:
    """Per-step magnitude ratios of one model, per guidance pass ("cond", "uncond"), for `len(list)` steps; a None
    entry is a step that was not measured (e.g. the other expert's steps), where no step is skipped."""
    passes: dict[str, tuple[float | None, ...]]
    source: str = ""

    def at(self, name: str, step: int, steps: int) -> float | None:
        """The ratio of `step` of `steps` for pass `name`, the table resampled by nearest index (MagCache's rule
        for tables measured with another step count)."""
        table = self.passes.get(name) or self.passes.get("cond")
        if not table or steps < 1:
            return None
        index = round(step * (len(table) - 1) / (steps - 1)) if steps > 1 else 0
        return table[min(index, len(table) - 1)]

    @classmethod
    def interleaved(cls, values: Sequence[float], source: str) -> MagnitudeRatios:
        """A published table: (cond, uncond) pairs per step."""
        return cls({"cond": tuple(values[0::2]), "uncond": tuple(values[1::2])}, source)


def ratios_path(model_file: str | Path) -> Path:
    """Where the measured ratios of a model file live: beside it, `<file>.magcache.json`."""
    return Path(str(model_file) + RATIOS_SUFFIX)


def model_file(handle: ModelHandle) -> Path | None:
    """The file `handle`'s model was loaded from (`sora.dit.load_dit` records it), or None."""
    loaded = getattr(handle.model, "loaded_from", None)
    return Path(loaded[0]) if loaded else None


def read_ratios(path: Path) -> MagnitudeRatios:
    """Ratios written by a calibration run (`write_ratios`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != RATIOS_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {RATIOS_FORMAT!r}")
        passes = {name: tuple(None if r is None else float(r) for r in values)
                  for name, values in data["ratios"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a readable MagCache calibration ({e}); delete it and calibrate again "
                         "(method 'magcache', calibrate on)") from None
    return MagnitudeRatios(passes, f"the ratios measured in {path.name}")


def write_ratios(path: Path, ratios: MagnitudeRatios, model: str, steps: int) -> None:
    """Write `ratios` to `path` atomically (a temporary file in the same folder, then renamed over it)."""
    data = {"format": RATIOS_FORMAT, "model": model, "steps": steps,
            "ratios": {name: list(values) for name, values in ratios.passes.items()}}
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def magnitude_ratios(handle: ModelHandle, path: Path | None = None) -> MagnitudeRatios | None:
    """The ratios magcache uses for `handle`: its calibration file (`path`, default beside the model's file) when
    there is one, else the published table of the model, else None."""
    if path is None and model_file(handle) is not None:
        path = ratios_path(model_file(handle))
    if path is not None and path.is_file():
        return read_ratios(path)
    key = published_model(handle)
    if key in MAGCACHE_RATIOS:
        return MagnitudeRatios.interleaved(MAGCACHE_RATIOS[key], f"MagCache's published {key} table")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Indicators
# ---------------------------------------------------------------------------------------------------------------

def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current − previous| / mean |previous|."""
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """Σ c_i·x^(n−i), coefficients highest degree first (numpy's poly1d)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def token_timestep_index(timestep: torch.Tensor, x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Which of the distinct timesteps each token has, [B, 1] or [B, L], as `WanDiT.forward` numbers them (sorted
    distinct values of the whole batch) for a latent `x` [B, C, T, H, W] and its timestep [B], [B, T] or [B, L]."""
    B, _, T, H, W = x.shape
    pt, ph, pw = patch
    frames, per_frame = T // pt, (H // ph) * (W // pw)
    t = torch.as_tensor(timestep, device=x.device).float()
    if t.ndim == 1:
        t = t[:, None]
    elif t.shape[1] != frames * per_frame and t.shape[1] == frames:
        t = t.repeat_interleave(per_frame, dim=1)  # per latent frame -> per token, frame-major
    return torch.unique(t, return_inverse=True)[1]


def modulated_input(tokens: torch.Tensor, e0: torch.Tensor, t_index: torch.Tensor, eps: float) -> torch.Tensor:
    """The timestep-modulated input of the first block, `LN(x)·(1 + scale) + shift` with shift, scale = e0[:, 0:2]
    of each token's timestep; tokens [b, L, dim], t_index [b, 1 or L] -> [b, L, dim]."""
    shift, scale = e0[:, 0][t_index], e0[:, 1][t_index]  # each [b, 1 or L, dim]
    return torch.addcmul(shift, F.layer_norm(tokens, tokens.shape[-1:], eps=eps), 1 + scale)


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class PassState:
    """What the cache keeps for one guidance pass during a run."""
    residual: torch.Tensor | None = None  # what a skip adds: block-stack output − input, or velocity − latent
    previous: torch.Tensor | None = None  # teacache: the last indicator; easycache: the last latent input
    output: torch.Tensor | None = None  # easycache: the last velocity (computed or predicted)
    computed: tuple[torch.Tensor, torch.Tensor] | None = None  # easycache: (input, velocity) last computed
    rate: float | None = None  # easycache: k = |Δ velocity| / |Δ input| of the last two computed steps
    accumulated: float = 0.0  # summed change (teacache, easycache) or error (magcache) since the last computed step
    ratio: float = 1.0  # magcache: the product of the ratios since the last computed step
    in_row: int = 0  # steps skipped since the last computed one
    norms: torch.Tensor | None = None  # magcache calibration: the last residual's norm per token
    decided: tuple | None = None  # ((step, sigma), skip): a retried call of the same step reuses the decision
    run: int = 0
    skipped: int = 0

    def computed_now(self) -> None:
        self.accumulated, self.ratio, self.in_row, self.run = 0.0, 1.0, 0, self.run + 1


@dataclass(frozen=True)
class CacheReport:
    """What a cache did in one run: per pass key ("cond", "uncond"; a second prompt of a side is "cond 2"),
    (forwards run, forwards skipped)."""
    settings: CacheSettings
    model: str
    passes: dict[str, tuple[int, int]]
    note: str = ""

    @property
    def run(self) -> int:
        return sum(r for r, _ in self.passes.values())

    @property
    def skipped(self) -> int:
        return sum(s for _, s in self.passes.values())

    def text(self) -> str:
        s = self.settings
        what = "magcache calibration" if s.calibrate else f"{s.method} (threshold {s.threshold:g}, steps " \
            f"{s.start:.0%}-{s.end:.0%})"
        total = self.run + self.skipped
        per_pass = ", ".join(f"{name} {skipped}/{run + skipped}" for name, (run, skipped) in self.passes.items())
        line = f"{what} on {self.model}: skipped {self.skipped} of {total} forwards ({per_pass})"
        return f"{line}; {self.note}" if self.note else line


class StepCache:
    """A forward wrapper (`ModelHandle.wrapped`) that skips forwards by one of METHODS; make it with `step_cache`.

    coefficients: TeaCache's polynomial for the model (None: the modulated input's raw change). ratios: MagCache's
    magnitude ratios (magcache). calibration_file: where a calibrating run writes them. source: where the
    coefficients or ratios come from, for messages. report: called with the report's text when a run ends (the
    node shows it); `last_report` keeps it.
    """

    def __init__(self, settings: CacheSettings, *, model: str, patch: Sequence[int], out_dim: int, eps: float,
                 coefficients: Sequence[float] | None = None, ratios: MagnitudeRatios | None = None,
                 calibration_file: Path | None = None, source: str = "",
                 report: Callable[[str], None] | None = None):
        self.settings = settings
        self.model = model
        self.source = source
        self.patch, self.out_dim, self.eps = tuple(patch), out_dim, eps
        self.coefficients = None if coefficients is None else tuple(coefficients)
        self.ratios = ratios
        self.calibration_file = calibration_file
        self.report = report
        self.last_report: CacheReport | None = None
        self._begin(None)

    def _begin(self, steps: int | None) -> None:
        self.states: dict[tuple[str, int], PassState] = {}
        self.steps, self.last_step = steps, -1
        self.measured: dict[str, list[float | None]] = {}  # calibration: pass name -> ratio per step
        self._marker: tuple | None = None  # (step, sigma) of the calls being counted
        self._occurrences: Counter = Counter()  # pass name -> calls of it made at the current (step, sigma)

    def describe(self) -> str:
        """One line on what the cache will do."""
        s = self.settings
        if s.calibrate:
            where = self.calibration_file or "memory only (the model has no file)"
            return f"magcache calibration of {self.model}: skips nothing, writes the ratios to {where}"
        how = {"teacache": self.source or "the modulated input's relative change (no published coefficients for "
                                          "this model)",
               "magcache": self.source, "easycache": "the output predicted from the input's change"}[s.method]
        limit = f", at most {s.max_skips} in a row" if s.max_skips else ""
        return f"{s.method} on {self.model}, threshold {s.threshold:g}, from {how}; skipping allowed from " \
               f"{s.start:.0%} to {s.end:.0%} of the steps{limit}"

    # -- the wrapper -----------------------------------------------------------------------------------------------

    def __call__(self, forward, x, timestep, context, call: ModelCall | None, **conditions):
        if call is None or not isinstance(x, torch.Tensor):  # outside a sampler, or a list of latents: no caching
            return forward(x, timestep, context, call, **conditions)
        if x.shape[0] % len(call.passes):
            raise InputError(f"a model call for passes {call.passes} has batch {x.shape[0]}, not a multiple of "
                             f"{len(call.passes)}; the step cache needs one equal chunk per pass")
        if self.steps != call.steps or call.step < self.last_step:
            self._begin(call.steps)  # a new run
        self.last_step = call.step
        marker = (call.step, call.sigma)
        if marker != self._marker:
            self._marker, self._occurrences = marker, Counter()
        seen = Counter()
        keys = []
        for name in call.passes:
            keys.append((name, self._occurrences[name] + seen[name]))
            seen[name] += 1
        states = [self.states.setdefault(k, PassState()) for k in keys]
        if self.settings.method == "easycache":
            out = self._easycache(forward, states, call, x, timestep, context, conditions)
        else:
            hook = functools.partial(self._block_stack, states, keys, call, x, timestep, conditions.get("blocks"))
            out = forward(x, timestep, context, call, **{**conditions, "blocks": hook})
        self._occurrences.update(seen)  # counted once the call succeeded (an out-of-memory retry reuses the keys)
        return out

    def end_run(self, finished: bool = True) -> CacheReport | None:
        """The sampler's run ended: report what was skipped, write a calibration, forget the run's state."""
        if not self.states:
            self._begin(None)
            return None
        note = ""
        if self.settings.calibrate:
            note = self._store_calibration() if finished else "calibration not written (the run did not finish)"
        passes = {}
        for (name, index), state in sorted(self.states.items(), key=lambda item: (item[0][0] != "cond", item[0])):
            passes[name if index == 0 else f"{name} {index + 1}"] = (state.run, state.skipped)
        report = CacheReport(self.settings, self.model, passes, note)
        self.last_report = report
        log.info("Sora Step Cache: %s", report.text())
        if self.report is not None:
            self.report(report.text())
        self._begin(None)
        return report

    # -- decisions -------------------------------------------------------------------------------------------------

    def _decided(self, state: PassState, call: ModelCall, decide: Callable[[], bool]) -> bool:
        """`decide()` once per pass and step; a retried call of the same step (out of memory) gets the same answer."""
        marker = (call.step, call.sigma)
        if state.decided is None or state.decided[0] != marker:
            wanted = decide()  # on every step: the indicators follow the run also where skipping is not allowed
            limit = self.settings.max_skips
            allowed = self.settings.may_skip(call.step, call.steps) and state.residual is not None and \
                not (limit and state.in_row >= limit)
            state.decided = (marker, wanted and allowed)
        return state.decided[1]

    def _under_threshold(self, state: PassState) -> bool:
        return self.settings.threshold > 0 and state.accumulated < self.settings.threshold

    def _teacache(self, state: PassState, signal: torch.Tensor) -> bool:
        previous, state.previous = state.previous, signal
        if previous is None or previous.shape != signal.shape:
            return False
        change = relative_l1(signal, previous)
        state.accumulated += polynomial(self.coefficients, change) if self.coefficients else change
        return self._under_threshold(state)

    def _magcache(self, state: PassState, name: str, call: ModelCall) -> bool:
        ratio = None if self.ratios is None or self.settings.calibrate else self.ratios.at(name, call.step, call.steps)
        if ratio is None:
            return False
        state.ratio *= ratio
        state.accumulated += abs(1.0 - state.ratio)
        return self._under_threshold(state)

    # -- teacache and magcache: the block stack -----------------------------------------------------------------

    def _block_stack(self, states, keys, call, x, timestep, inner, run, tokens, e, e0):
        """The DiT's block-stack hook: the blocks' output, or each pass's tokens plus its stored residual."""
        chunks = tokens.chunk(len(states))
        if self.settings.method == "teacache":
            signals = self._teacache_signals(chunks, x, timestep, e0)
            decide = [functools.partial(self._teacache, s, signal) for s, signal in zip(states, signals)]
        else:
            decide = [functools.partial(self._magcache, s, name, call) for s, (name, _) in zip(states, keys)]
        decisions = [self._decided(s, call, d) for s, d in zip(states, decide)]  # every pass decides (its state)
        if all(decisions):
            for state in states:
                state.skipped, state.in_row = state.skipped + 1, state.in_row + 1
            return torch.cat([c + s.residual for c, s in zip(chunks, states)])
        out = run(tokens) if inner is None else inner(run, tokens, e, e0)
        for (name, _), state, before, after in zip(keys, states, chunks, out.chunk(len(states))):
            state.residual = after - before
            state.computed_now()
            if self.settings.calibrate:
                self._measure(state, name, call)
        return out

    def _teacache_signals(self, chunks, x, timestep, e0) -> list[torch.Tensor]:
        if self.coefficients is not None:
            return [e0] * len(chunks)  # the published fits are for the projected timestep embedding
        t_index = token_timestep_index(timestep, x, self.patch)  # [B, 1 or L]
        if t_index.shape[1] not in (1, chunks[0].shape[1]):
            return [e0] * len(chunks)  # tokens of another layout (a share of a split sequence): the timestep only
        return [modulated_input(c, e0, i, self.eps) for c, i in zip(chunks, t_index.chunk(len(chunks)))]

    def _measure(self, state: PassState, name: str, call: ModelCall) -> None:
        """Calibration: the mean over tokens of |r_t| / |r_{t−1}| for this pass at this step."""
        norms = state.residual.norm(dim=-1)  # [b, L]
        table = self.measured.setdefault(name, [None] * call.steps)
        if table[call.step] is None:  # one value per step (a second prompt of the side is not measured again)
            table[call.step] = 1.0 if state.norms is None else float((norms / state.norms.clamp_min(1e-12)).mean())
        state.norms = norms

    def _store_calibration(self) -> str:
        ratios = MagnitudeRatios({name: tuple(values) for name, values in self.measured.items()})
        self.ratios = ratios
        if self.calibration_file is None:
            return "ratios measured but not written: the model has no file to store them beside"
        write_ratios(self.calibration_file, ratios, self.model, self.steps or 0)
        return f"wrote the magnitude ratios to {self.calibration_file}"

    # -- easycache: the whole model ------------------------------------------------------------------------------

    def _easycache(self, forward, states, call, x, timestep, context, conditions):
        inputs = x[:, :self.out_dim].chunk(len(states))  # the noisy latent (not Wan I2V's image channels)
        decisions = [self._decided(s, call, functools.partial(self._easycache_change, s, i))
                     for s, i in zip(states, inputs)]
        for state, latent in zip(states, inputs):
            state.previous = latent.clone()
        if all(decisions):
            outputs = [latent + s.residual for latent, s in zip(inputs, states)]
            for state, output in zip(states, outputs):
                state.output, state.skipped, state.in_row = output, state.skipped + 1, state.in_row + 1
            return torch.cat(outputs)
        out = forward(x, timestep, context, call, **conditions)
        for state, latent, output in zip(states, inputs, out.float().chunk(len(states))):
            if state.computed is not None:
                before, after = state.computed
                state.rate = float((output - after).abs().mean() / (latent - before).abs().mean().clamp_min(1e-12))
            state.computed, state.output = (latent.clone(), output), output
            state.residual = output - latent
            state.computed_now()
        return out

    def _easycache_change(self, state: PassState, latent: torch.Tensor) -> bool:
        if state.rate is None or state.previous is None or state.output is None:
            return False
        change = (latent - state.previous).abs().mean() / state.output.abs().mean().clamp_min(1e-12)
        state.accumulated += state.rate * float(change)
        return self._under_threshold(state)


def step_cache(handle: ModelHandle, settings: CacheSettings, *, report: Callable[[str], None] | None = None,
               ratios_file: Path | None = None) -> StepCache:
    """A `StepCache` for `handle`'s model (wrap it with `handle.wrapped(...)`).

    teacache uses the published coefficients of the model when there are some. magcache reads the model's ratios
    (`ratios_file`, default `<model file>.magcache.json`, else the published table) and refuses a model that has
    none; with `settings.calibrate` it measures them and writes `ratios_file` when the run ends.
    """
    config = handle.config
    key = published_model(handle)
    coefficients = TEACACHE_COEFFICIENTS.get(key) if settings.method == "teacache" else None
    source = f"TeaCache's {key} coefficients" if coefficients is not None else ""
    path = ratios_file
    if path is None and model_file(handle) is not None:
        path = ratios_path(model_file(handle))
    ratios = None
    if settings.method == "magcache" and not settings.calibrate:
        ratios = magnitude_ratios(handle, path)
        if ratios is None:
            where = f" (none at {path})" if path is not None else ""
            raise InputError(f"magcache needs the magnitude ratios of {handle.name}: no calibration file{where} and "
                             "no published table for this model; run it once with calibrate on (it skips nothing "
                             "and writes them), or use teacache or easycache")
        source = ratios.source
    if settings.calibrate and path is not None and not os.access(path.parent, os.W_OK):
        raise InputError(f"cannot write the MagCache calibration to {path.parent}; make the folder writable")
    return StepCache(settings, model=handle.name, patch=config.patch_size, out_dim=config.out_dim, eps=config.eps,
                     coefficients=coefficients, ratios=ratios, calibration_file=path if settings.calibrate else None,
                     source=source, report=report)
