"""Forward speed and memory of our Wan DiT against diffusers' `WanTransformer3DModel` on the same weights and inputs.

    python benchmarks/dit_forward.py [--repeats 7] [--threads N] [--device cpu|cuda]

Float32 on the CPU (CUDA when present, unless --device says otherwise). Both models share one set of random
weights: diffusers' state dict is renamed with our conversion table and assigned into ours. For every config the
two forwards run back to back (alternating which goes first), repeatedly, after a warm-up. Times are medians; the
ratio is the median of the ratios of back-to-back pairs, so that load from other processes on a shared machine,
which drifts over seconds, hits both sides of a ratio alike. Peak memory is what a forward adds on top of the
weights: CUDA's allocator peak, or on the CPU the process' resident high-water mark (reset through
/proc/self/clear_refs, with large allocations forced onto mmap so that freed memory leaves the process and each
forward's own peak shows).

The last line reads `dit_forward: max_ratio=R max_rel_err=E` (R: the largest ratio ours / diffusers over the
configs; E: the largest max |ours - diffusers| / max |diffusers|).
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from sora.checkpoints import load_into
from sora.dit import DiTConfig, WanDiT, convert_diffusers


@dataclass
class Case:
    name: str
    config: DiTConfig
    latent: tuple[int, int, int, int]  # C, T, H, W
    per_token: bool = False  # Wan 2.2 TI2V: a timestep per token, first latent frame clean


SMALL = DiTConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=2)
WAN21_1_3B_2L = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)  # the 1.3B's widths, 2 of 30 layers
TI2V_NARROW = DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=768, ffn_dim=2048, num_heads=6, num_layers=2,
                        latent_format="wan22", per_token_timesteps=True)
CASES = [
    Case("d512 2L", SMALL, (16, 4, 16, 16)),
    Case("1.3B-shaped 2L", WAN21_1_3B_2L, (16, 4, 32, 32)),
    Case("1.3B-shaped 2L", WAN21_1_3B_2L, (16, 5, 32, 52)),
    Case("ti2v 48ch per-token d768 2L", TI2V_NARROW, (48, 8, 32, 32), per_token=True),
]


def build(config: DiTConfig, device: torch.device) -> tuple[WanDiT, WanTransformer3DModel]:
    ref = WanTransformer3DModel(
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, in_channels=config.in_dim,
        out_channels=config.out_dim, text_dim=config.text_dim, freq_dim=config.freq_dim, ffn_dim=config.ffn_dim,
        num_layers=config.num_layers)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():  # weights of a sensible scale so that outputs are not degenerate
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in) * (0.5 if p.ndim == 3 else 1.0))
    ref = ref.to(device).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = WanDiT(config)
    load_into(ours, convert_diffusers(ref.state_dict()), what="Wan DiT")
    return ours.eval(), ref


def inputs(case: Case, device: torch.device):
    gen = torch.Generator().manual_seed(1)
    C, T, H, W = case.latent
    x = torch.randn(1, C, T, H, W, generator=gen)
    tokens = T * (H // 2) * (W // 2)
    if case.per_token:
        t = torch.full((1, tokens), 875.0)
        t[:, : tokens // T] = 0.0
    else:
        t = torch.tensor([875.0])
    context = torch.randn(1, 100, case.config.text_dim, generator=gen)  # a 100-token prompt
    return x.to(device), t.to(device), context.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Extra memory a call needs beyond what is resident before it, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            # glibc keeps freed blocks below its (adaptive) mmap threshold; a fixed 64 KiB threshold returns every
            # large tensor to the system when freed, so the high-water mark measures one call, not the history.
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD

    def measure(self, fn) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        self.libc.malloc_trim(0)  # hand back what earlier, smaller allocations left free in the heap
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def run_case(case: Case, device: torch.device, repeats: int) -> dict:
    ours, ref = build(case.config, device)
    ours.to(device)
    x, t, context = inputs(case, device)
    padded = F.pad(context, (0, 0, 0, case.config.text_len - context.shape[1]))  # diffusers' pipeline pads

    def run_ours():
        return ours(x, t, context)

    def run_ref():
        return ref(x, t, padded, return_dict=False)[0]

    times = {"ours": [], "diffusers": []}
    with torch.no_grad():
        out, expected = run_ours(), run_ref()  # warm-up
        for i in range(repeats):
            pair = (("ours", run_ours), ("diffusers", run_ref))
            for name, fn in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
    rel_err = ((out - expected).abs().max() / expected.abs().max()).item()
    tokens = math.prod(s // p for s, p in zip(case.latent[1:], case.config.patch_size))
    return {"tokens": tokens, "ours": statistics.median(times["ours"]) * 1e3,
            "diffusers": statistics.median(times["diffusers"]) * 1e3, "rel_err": rel_err,
            "ratio": statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))}


def measure_memory(case: Case, device: torch.device, meter: PeakMemory) -> tuple[float, float]:
    ours, ref = build(case.config, device)
    ours.to(device)
    x, t, context = inputs(case, device)
    padded = F.pad(context, (0, 0, 0, case.config.text_len - context.shape[1]))
    with torch.no_grad():
        ours(x, t, context), ref(x, t, padded)  # warm-up: one-time buffers (kernels, RoPE tables) are not peaks
        mine = meter.measure(lambda: ours(x, t, context))
        theirs = meter.measure(lambda: ref(x, t, padded, return_dict=False))
    return mine, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model and config (median)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, float32, {torch.get_num_threads()} CPU threads, medians of {args.repeats} runs, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    results = [run_case(case, device, args.repeats) for case in CASES]
    meter = PeakMemory(device)  # after the timings: the fixed mmap threshold slows allocation-heavy code
    for case, result in zip(CASES, results):
        result["mem_ours"], result["mem_diffusers"] = measure_memory(case, device, meter)

    header = f"{'config':<30}{'tokens':>7}{'ours ms':>11}{'diffusers ms':>14}{'ratio':>7}" \
             f"{'peak MiB ours':>15}{'peak MiB diffusers':>20}"
    print(header)
    for case, r in zip(CASES, results):
        print(f"{case.name:<30}{r['tokens']:>7}{r['ours']:>11.1f}{r['diffusers']:>14.1f}"
              f"{r['ratio']:>7.3f}{r['mem_ours']:>15.1f}{r['mem_diffusers']:>20.1f}")
    max_ratio = max(r["ratio"] for r in results)
    max_rel_err = max(r["rel_err"] for r in results)
    print(f"dit_forward: max_ratio={max_ratio:.3f} max_rel_err={max_rel_err:.2e}")


if __name__ == "__main__":
    main()
