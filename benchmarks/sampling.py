"""Cost of the sampling engine: batched against sequential guidance, and each solver's own update.

    python benchmarks/sampling.py [--repeats 2] [--threads N] [--device cpu|cuda]

1. Guidance: `sample()` with a random WanDiT (Wan 2.1 1.3B widths, 2 of its 30 layers), guidance 5, 2 UniPC steps,
   the conditional and unconditional passes batched in one forward or run one after the other. The two modes
   alternate so that load from other processes hits both alike; times are medians. Peak memory is what a run adds
   on top of the weights: CUDA's allocator peak, or on the CPU the resident high-water mark (reset through
   /proc/self/clear_refs, with large allocations forced onto mmap so freed memory leaves the process).
2. Solvers: the update alone (no model) per step on a Wan 2.1 480p, 81-frame latent [1, 16, 21, 60, 104].

The last line reads `sampling: sequential/batched time=R peak=P` (ratios of the sequential mode to the batched).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import re
import statistics
import time
from pathlib import Path

import torch

from sora.dit import DiTConfig, WanDiT
from sora.samplers import SAMPLERS, make_solver, sample
from sora.schedules import flow_sigmas

MODEL = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)
LATENT = (1, 16, 5, 32, 32)  # 17 frames at 256x256: 1280 tokens
SOLVER_LATENT = (1, 16, 21, 60, 104)
STEPS = 2


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


class Meter:
    """Wall time and peak extra memory (MiB) of one call."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big buffers go back to the OS

    def __call__(self, fn) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - before) / 2**20
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, (_status_kib("VmHWM") - before) / 1024


def bench_guidance(device: torch.device, repeats: int) -> dict[bool, tuple[float, float]]:
    model = WanDiT(MODEL).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    latent = torch.zeros(LATENT)
    positive = torch.randn(1, 24, MODEL.text_dim, generator=generator)
    negative = torch.randn(1, 60, MODEL.text_dim, generator=generator)
    meter = Meter(device)
    results = {True: [], False: []}

    def run(batched: bool):
        with torch.no_grad():
            sample(model, latent, flow_sigmas(STEPS, 5.0), positive, negative, guidance=5.0, batched_cfg=batched,
                   device=device)

    run(True)  # warm-up
    for _ in range(repeats):
        for batched in (True, False):
            results[batched].append(meter(functools.partial(run, batched)))
    return {mode: (statistics.median(t for t, _ in runs) / STEPS, max(p for _, p in runs))
            for mode, runs in results.items()}


def bench_solvers(device: torch.device, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SOLVER_LATENT, generator=generator).to(device)
    v = torch.randn(SOLVER_LATENT, generator=generator).to(device)
    sigmas = flow_sigmas(10, 5.0).tolist()
    times = {}
    for name in SAMPLERS:
        per_step = []
        for _ in range(repeats):
            solver = make_solver(name, sigmas)
            start = time.perf_counter()
            for i in range(10):
                solver.step(i, x, v)
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step.append((time.perf_counter() - start) / 10)
        times[name] = statistics.median(per_step)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, WanDiT dim {MODEL.dim} x {MODEL.num_layers} layers, "
          f"latent {list(LATENT)}, {STEPS} steps, guidance 5")

    guidance = bench_guidance(device, args.repeats)
    print(f"\n{'guidance':<12}{'s/step':>10}{'peak MiB':>12}")
    for batched, label in ((True, "batched"), (False, "sequential")):
        seconds, peak = guidance[batched]
        print(f"{label:<12}{seconds:>10.3f}{peak:>12.1f}")

    solvers = bench_solvers(device, args.repeats)
    print(f"\n{'solver':<12}{'ms/step':>10}   (update only, latent {list(SOLVER_LATENT)})")
    for name, seconds in solvers.items():
        print(f"{name:<12}{seconds * 1000:>10.1f}")

    time_ratio = guidance[False][0] / guidance[True][0]
    peak_ratio = guidance[False][1] / guidance[True][1]
    print(f"\nsampling: sequential/batched time={time_ratio:.2f} peak={peak_ratio:.2f}")


if __name__ == "__main__":
    main()
