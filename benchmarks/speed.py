"""Speed without new weights: step caches against the plain sampler, and compiled blocks against eager ones.

    python benchmarks/speed.py [--quick] [--threads 1] [--prompts N] [--skip-nano] [--skip-random] [--skip-compile]

1. Nano (the shipped model, a real trained one, so quality is measurable), at its default 20 steps and at 50: the
   32 colour x direction prompts of benchmarks/nano_quality.py (64x64, 33 frames, UniPC, guidance 5, empty
   negative), first plain, then through each cache setting (method x threshold, start 0.2, end 1). Per setting:
   forwards run and skipped, sampling wall time (summed over the prompts) and the speedup against the plain runs,
   the PSNR of the decoded clips against the plain ones (pooled MSE, peak-to-peak 2 for -1..1; the worst clip's
   too) and the judge's colour and direction accuracy. judge_drop is the larger of the two accuracy drops
   against the plain runs (with 32 prompts one more miss is 0.031). MagCache's ratios are calibrated first on
   one prompt outside the set, for each step count, into a temporary folder.
2. A random DiT with the Wan 2.1 1.3B widths (2 of its 30 layers; the published TeaCache coefficients and MagCache
   table apply to its shape) on a 768-token latent, 20 steps: forwards, time, speedup, and the PSNR of the latent
   (a random model has no VAE, and its output says nothing about quality; this part shows the caches' overhead
   and skip counts at a real width).
3. Compiled blocks: on the same 1.3B-shaped DiT and latent, one forward in float32 and in bf16: eager, the
   compiled first call (compilation included) and the compiled steady state (median); and nano's 20-step sampling
   eager and compiled.

Timings on a shared machine drift: runs alternate with their plain counterparts per prompt and sums are compared.
`--quick` uses 8 prompts, fewer thresholds, 8 steps of the random DiT and 2 repeats.

The last line reads `speed: cache_speedup=S psnr_db=P judge_drop=D compile_speedup=C`: S, P and D for the fastest
cache setting at 50 nano steps whose judge_drop is at most 0.03 and whose PSNR is at least 30 dB (a faster
setting that keeps the judge's verdicts but blurs the clips does not count), C the steady-state compile speedup of
the 1.3B-shaped float32 forward, the pack's CPU precision (or `compile_speedup=n/a (reason)` where inductor cannot
build here).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sora import compile as compiled_blocks
from sora import ops, step_cache
from sora.dit import DiTConfig, WanDiT
from sora.handle import ModelHandle
from sora.nano import judge
from sora.nano.pipeline import NanoPipeline
from sora.samplers import sample
from sora.schedules import flow_sigmas

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine
from nano_quality import cases  # the benchmark prompts, one definition

START, END = 0.2, 1.0
SETTINGS = [step_cache.CacheSettings(method, threshold, START, END) for method, thresholds in (
    ("easycache", (0.05, 0.1, 0.15, 0.2)), ("teacache", (0.1, 0.2, 0.3)), ("magcache", (0.12, 0.24)))
    for threshold in thresholds]
QUICK_SETTINGS = [step_cache.CacheSettings(method, threshold, START, END) for method, threshold in (
    ("easycache", 0.1), ("easycache", 0.15), ("teacache", 0.2), ("magcache", 0.24))]
WAN_1_3B_2L = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)
RANDOM_LATENT = (1, 16, 4, 24, 32)  # 4 x 12 x 16 = 768 tokens
MAX_DROP, MIN_PSNR = 0.03, 30.0  # the quality a cache setting must keep to count as "best"
CALIBRATION_PROMPT, CALIBRATION_SEED = "a white square moving to the left on a gray background", 7


@dataclasses.dataclass
class Outcome:
    name: str
    seconds: float = 0.0
    run: int = 0
    skipped: int = 0
    videos: list = dataclasses.field(default_factory=list)
    color_hits: int = 0
    motion_hits: int = 0


def psnr(videos: list[torch.Tensor], references: list[torch.Tensor], peak: float = 2.0) -> tuple[float, float]:
    """(PSNR of the pooled MSE, the worst clip's PSNR) in dB; inf where identical."""
    errors = [float(((v - r) ** 2).mean()) for v, r in zip(videos, references)]

    def db(mse: float) -> float:
        return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)
    return db(statistics.mean(errors)), db(max(errors))


def timed(fn, *args):
    """(fn(*args), its wall time in seconds)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# Nano
# ---------------------------------------------------------------------------------------------------------------

def label(settings: step_cache.CacheSettings) -> str:
    extra = "" if (settings.start, settings.end) == (START, END) else f" {settings.start:g}-{settings.end:g}"
    return f"{settings.method} {settings.threshold:g}{extra}"


def nano_caches(pipe: NanoPipeline, steps: int, settings: list, folder: Path) -> list[tuple[str, object]]:
    """(name, cache) for every setting; magcache calibrated on a prompt outside the benchmark set first."""
    base = ModelHandle(pipe.dit, "nano")
    ratios = folder / f"nano_{steps}.magcache.json"
    calibrate = step_cache.step_cache(base, step_cache.CacheSettings("magcache", 0.0, calibrate=True),
                                      ratios_file=ratios)
    sample(base.wrapped(calibrate), latent_of(pipe), flow_sigmas(steps, pipe.shift), pipe.encode([CALIBRATION_PROMPT]),
           pipe.encode([""]), guidance=pipe.guidance, seed=CALIBRATION_SEED)
    return [(label(config), step_cache.step_cache(base, config, ratios_file=ratios)) for config in settings]


def latent_of(pipe: NanoPipeline) -> torch.Tensor:
    cfg = pipe.vae.config
    return torch.zeros(1, cfg.z_dim, 9, 8, 8)  # 33 frames at 64x64


def nano_sample(pipe: NanoPipeline, model, sigmas, positive, negative, seed: int) -> torch.Tensor:
    return sample(model, latent_of(pipe), sigmas, positive, negative, guidance=pipe.guidance, seed=seed)


def nano_part(pipe: NanoPipeline, steps: int, prompts: list, settings: list) -> list[tuple[Outcome, dict]]:
    """Runs every prompt plain and through every cache; returns (outcome, summary) per setting, plain first."""
    negative = pipe.encode([""])
    sigmas = flow_sigmas(steps, pipe.shift)
    with tempfile.TemporaryDirectory() as folder:
        caches = nano_caches(pipe, steps, settings, Path(folder))
        base = ModelHandle(pipe.dit, "nano")
        plain = Outcome("plain")
        outcomes = [Outcome(name) for name, _ in caches]
        for _, _, caption, seed in prompts:
            positive = pipe.encode([caption])
            latent, seconds = timed(nano_sample, pipe, base, sigmas, positive, negative, seed)
            plain.seconds += seconds
            plain.run += 2 * steps
            plain.videos.append(latent)
            for outcome, (_, cache) in zip(outcomes, caches):
                latent, seconds = timed(nano_sample, pipe, base.wrapped(cache), sigmas, positive, negative, seed)
                outcome.seconds += seconds
                outcome.run += cache.last_report.run
                outcome.skipped += cache.last_report.skipped
                outcome.videos.append(latent)
    results = []
    for outcome in [plain, *outcomes]:
        outcome.videos = [pipe.decode(v)[0] for v in outcome.videos]
        for video, (color, direction, _, _) in zip(outcome.videos, prompts):
            verdict = judge.judge_video(video)
            outcome.color_hits += verdict.color == color
            outcome.motion_hits += verdict.direction == direction
    n = len(prompts)
    for outcome in [plain, *outcomes]:
        pooled, worst = psnr(outcome.videos, plain.videos)
        color, motion = outcome.color_hits / n, outcome.motion_hits / n
        drop = max(plain.color_hits / n - color, plain.motion_hits / n - motion)
        results.append((outcome, dict(speedup=plain.seconds / outcome.seconds, psnr=pooled, worst=worst,
                                      color=color, motion=motion, drop=drop)))
    return results


def print_nano(steps: int, results: list[tuple[Outcome, dict]], prompts: int) -> None:
    print(f"\nnano, {steps} steps, {prompts} prompts (start {START}, end {END}):")
    print(f"  {'setting':<16} {'forwards':>9} {'skipped':>8} {'seconds':>8} {'speedup':>8} {'psnr dB':>8} "
          f"{'worst dB':>8} {'colour':>7} {'motion':>7} {'drop':>6}")
    for outcome, s in results:
        print(f"  {outcome.name:<16} {outcome.run:>9} {outcome.skipped:>8} {outcome.seconds:>8.2f} "
              f"{s['speedup']:>8.2f} {s['psnr']:>8.1f} {s['worst']:>8.1f} {s['color']:>7.2f} {s['motion']:>7.2f} "
              f"{s['drop']:>6.3f}")


# ---------------------------------------------------------------------------------------------------------------
# The 1.3B-shaped random DiT
# ---------------------------------------------------------------------------------------------------------------

def random_dit() -> WanDiT:
    model = WanDiT(WAN_1_3B_2L).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def random_part(model: WanDiT, steps: int, settings: list) -> None:
    handle = ModelHandle(model, "wan21_1.3B-shaped (2 layers, random)")
    context = torch.randn(1, 40, WAN_1_3B_2L.text_dim, generator=torch.Generator().manual_seed(1))
    negative = torch.randn(1, 40, WAN_1_3B_2L.text_dim, generator=torch.Generator().manual_seed(2))
    latent = torch.zeros(RANDOM_LATENT)

    def one(model_handle):
        return sample(model_handle, latent, flow_sigmas(steps, 5.0), context, negative, guidance=5.0, seed=0)

    plain, plain_s = timed(one, handle)
    tokens = RANDOM_LATENT[2] * RANDOM_LATENT[3] * RANDOM_LATENT[4] // 4
    print(f"\nrandom DiT, Wan 2.1 1.3B widths, 2 layers, {tokens} tokens, {steps} steps (published tables: "
          f"{step_cache.published_model(handle)}):")
    print(f"  {'setting':<16} {'forwards':>9} {'skipped':>8} {'seconds':>8} {'speedup':>8} {'latent psnr':>11}")
    print(f"  {'plain':<16} {2 * steps:>9} {0:>8} {plain_s:>8.2f} {1.0:>8.2f} {'inf':>11}")
    scale = float(plain.abs().max())  # a random model's latent has no fixed range: peak-to-peak of the plain one
    for config in settings:
        cache = step_cache.step_cache(handle, config)
        out, seconds = timed(one, handle.wrapped(cache))
        report = cache.last_report
        db, _ = psnr([out], [plain], peak=2 * scale)
        print(f"  {label(config):<16} {report.run:>9} {report.skipped:>8} {seconds:>8.2f} {plain_s / seconds:>8.2f} "
              f"{db:>11.1f}")


# ---------------------------------------------------------------------------------------------------------------
# Compiled blocks
# ---------------------------------------------------------------------------------------------------------------

def compile_part(model: WanDiT, pipe: NanoPipeline, repeats: int) -> float | None:
    """Prints eager, first and steady compiled times; returns the 1.3B-shaped steady-state speedup."""
    reason = compiled_blocks.unavailable("cpu")
    if reason is not None:
        print(f"\ncompiled blocks: not measured, inductor cannot build here: {reason}")
        return None
    x = torch.randn(RANDOM_LATENT, generator=torch.Generator().manual_seed(3))
    t = torch.full((1,), 700.0)
    context = torch.randn(1, 40, WAN_1_3B_2L.text_dim, generator=torch.Generator().manual_seed(4))
    speedups = {}
    print()
    for dtype in (torch.float32, torch.bfloat16):
        if dtype != torch.float32:  # the same weights, stored and multiplied in bf16
            model = random_dit()
            ops.cast_weights(model, dtype)
            model.set_compute(dtype=dtype)
        eager = ModelHandle(model, "1.3B-shaped")
        fast = compiled_blocks.compile_blocks(eager, device="cpu")
        with torch.no_grad():
            eager(x, t, context)  # warm-up
            first_out, first = timed(fast, x, t, context)
            eager_times, fast_times = [], []
            for _ in range(repeats):  # alternating, so that drifting load hits both
                eager_out, seconds = timed(eager, x, t, context)
                eager_times.append(seconds)
                fast_out, seconds = timed(fast, x, t, context)
                fast_times.append(seconds)
        error = float((fast_out - eager_out).abs().max() / eager_out.abs().max())
        eager_s, fast_s = statistics.median(eager_times), statistics.median(fast_times)
        speedups[dtype] = eager_s / fast_s
        print(f"compiled blocks, 1.3B-shaped forward (2 layers, {x.shape[2] * x.shape[3] * x.shape[4] // 4} tokens, "
              f"{str(dtype).removeprefix('torch.')}): eager {eager_s:.3f} s, compiled first call {first:.1f} s "
              f"(compilation included), steady {fast_s:.3f} s: {eager_s / fast_s:.2f}x; max rel. difference "
              f"{error:.1e}")

    nano = ModelHandle(pipe.dit, "nano")
    nano_fast = compiled_blocks.compile_blocks(nano, device="cpu")
    prompt, negative = pipe.encode([CALIBRATION_PROMPT]), pipe.encode([""])
    sigmas = flow_sigmas(pipe.steps, pipe.shift)
    _, nano_first = timed(nano_sample, pipe, nano_fast, sigmas, prompt, negative, 0)
    eager_times, fast_times = [], []
    for _ in range(repeats):
        eager_times.append(timed(nano_sample, pipe, nano, sigmas, prompt, negative, 0)[1])
        fast_times.append(timed(nano_sample, pipe, nano_fast, sigmas, prompt, negative, 0)[1])
    print(f"compiled blocks, nano {pipe.steps}-step sampling: eager {statistics.median(eager_times):.3f} s, compiled "
          f"first run {nano_first:.1f} s, steady {statistics.median(fast_times):.3f} s: "
          f"{statistics.median(eager_times) / statistics.median(fast_times):.2f}x")
    return speedups[torch.float32]


# ---------------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts, fewer thresholds, shorter random part")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: nano is fastest so)")
    parser.add_argument("--prompts", type=int, default=0, help="use the first N benchmark prompts (0: all 32)")
    parser.add_argument("--skip-random", action="store_true", help="leave out the random 1.3B-shaped DiT")
    parser.add_argument("--skip-compile", action="store_true", help="leave out compiled blocks")
    parser.add_argument("--skip-nano", action="store_true", help="leave out the nano runs (no cache figures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    count = args.prompts or (8 if args.quick else 32)
    prompts = cases()[:count]
    pipe = NanoPipeline.load()
    print(f"torch {torch.__version__}, cpu: {machine.cpu()}")

    best = None
    for steps in () if args.skip_nano else (20, 50):
        results = nano_part(pipe, steps, prompts, settings)
        print_nano(steps, results, len(prompts))
        if steps == 50:
            keeping = [(s["speedup"], o.name, s) for o, s in results[1:]
                       if s["drop"] <= MAX_DROP and s["psnr"] >= MIN_PSNR]
            best = max(keeping, key=lambda item: item[0]) if keeping else None

    model = random_dit() if not (args.skip_random and args.skip_compile) else None
    if not args.skip_random:
        random_part(model, 8 if args.quick else 20, settings)
    compile_speedup, reason = None, None
    if not args.skip_compile:
        compile_speedup = compile_part(model, pipe, 2 if args.quick else 5)
        reason = compiled_blocks.unavailable("cpu")
    if args.skip_nano:
        cache_part = "cache_speedup=n/a psnr_db=n/a judge_drop=n/a"
    elif best is None:
        print(f"\nno cache setting kept judge_drop <= {MAX_DROP} and psnr >= {MIN_PSNR:g} dB at 50 steps")
        cache_part = "cache_speedup=n/a psnr_db=n/a judge_drop=n/a"
    else:
        speedup, name, s = best
        print(f"\nfastest cache setting at 50 steps with judge_drop <= {MAX_DROP} and psnr >= {MIN_PSNR:g} dB: {name}")
        cache_part = f"cache_speedup={speedup:.2f} psnr_db={s['psnr']:.1f} judge_drop={s['drop']:.3f}"
    if compile_speedup is not None:
        compile_text = f"compile_speedup={compile_speedup:.2f}"
    else:
        compile_text = "compile_speedup=n/a" + (f" ({reason})" if reason else " (not measured)")
    print(f"speed: {cache_part} {compile_text}")


if __name__ == "__main__":
    main()
