"""Forward speed and memory of our Wan DiT against diffusers' `WanTransformer3DModel` on the same weights and inputs.

    python benchmarks/dit_forward.py [--repeats 7] [--threads N] [--device cpu|cuda] [--dtype float32|bf16]
                                     [--attention sdpa|matmul|...]

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

`--attention` picks our attention backend (`sora.attention`; default sdpa, which diffusers uses too); `matmul` is
the CPU path that runs the scores through plain bf16 products (its scores are rounded to bf16 once more).

`--dtype bf16`: bf16 weights and compute on both sides (see `build`), plus a 3,510-token config, 256 to 3,510
tokens in all. The weights are rounded to bf16 first, so a float32 run of diffusers on the same values is the exact
reference: "err ours" and "err diffusers" are max |out - float32| / max |float32|, and E is the largest "err ours".
Tolerance 4·eps·sqrt(layers), eps = 2^-8 (2.2e-2 for 2 layers): a bf16 value carries a relative rounding of
u = eps/2; a block rounds about 16 activations in series (norm outputs, q/k/v, RoPE, attention weights and output,
FFN input, hidden and GELU, the projections), with independent signs 4u = 2·eps; blocks add independently
(sqrt(layers)); twice that covers the amplification of logit errors by softmax and of GELU. Max over max is about
std over std here (both maxima sit near 4.5 standard deviations over the 10^5+ outputs). Diffusers' own bf16
error, printed next to ours, falls inside it as well.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from machine import cpu as cpu_name

from sora.attention import BACKENDS
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
# bf16 also runs 3,510 tokens: 33 frames of 240x416 (latent 9 x 30 x 52, patch grid 9 x 15 x 26)
CASES_BF16 = [*CASES, Case("1.3B-shaped 2L", WAN21_1_3B_2L, (16, 9, 30, 52))]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def build(config: DiTConfig, device: torch.device, dtype: torch.dtype = torch.float32,
          attention: str = "sdpa"):
    """(ours, diffusers, float32 diffusers or None): models on one set of random weights, in `dtype`.

    Below float32 the weights are first rounded to `dtype`, so that the float32 reference holds exactly the
    weights of the half-precision models; ours gets every tensor in `dtype`, as `load_dit` stores a bf16 file, and
    computes in it (`set_compute`); diffusers is saved and reloaded with `from_pretrained(torch_dtype=dtype)`, as
    users load it (its `_keep_in_fp32_modules` stay float32).
    """
    ref = WanTransformer3DModel(
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, in_channels=config.in_dim,
        out_channels=config.out_dim, text_dim=config.text_dim, freq_dim=config.freq_dim, ffn_dim=config.ffn_dim,
        num_layers=config.num_layers)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():  # weights of a sensible scale so that outputs are not degenerate
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in) * (0.5 if p.ndim == 3 else 1.0))
            p.copy_(p.to(dtype))
    ref = ref.to(device).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = WanDiT(config)
    load_into(ours, {k: v.to(dtype) for k, v in convert_diffusers(ref.state_dict()).items()}, what="Wan DiT")
    ours.set_compute(dtype=dtype, attention=attention)
    if dtype == torch.float32:
        return ours.eval(), ref, None
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        half = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    return ours.eval(), half.to(device).eval().requires_grad_(False), ref


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


def forwards(case: Case, device: torch.device, dtype: torch.dtype, attention: str):
    """(run ours, run diffusers, run the float32 reference or None), each returning a float32 velocity."""
    ours, ref, reference = build(case.config, device, dtype, attention)
    ours.to(device)
    x, t, context = inputs(case, device)
    padded = F.pad(context, (0, 0, 0, case.config.text_len - context.shape[1]))  # diffusers' pipeline pads
    x_ref, padded_ref = x.to(dtype), padded.to(dtype)  # diffusers' pipeline casts to the transformer's dtype

    def run_ours():
        return ours(x, t, context)

    def run_ref():
        return ref(x_ref, t, padded_ref, return_dict=False)[0].float()

    def run_reference():
        return reference(x, t, padded, return_dict=False)[0]

    return run_ours, run_ref, None if reference is None else run_reference


def bf16_tolerance(layers: int) -> float:
    """Largest max-relative error of a bf16 forward against float32 that counts as rounding (module docstring)."""
    return 4 * 2**-8 * math.sqrt(layers)


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


def run_case(case: Case, device: torch.device, repeats: int, dtype: torch.dtype, attention: str) -> dict:
    run_ours, run_ref, run_reference = forwards(case, device, dtype, attention)
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
        exact = expected if run_reference is None else run_reference()
    tokens = math.prod(s // p for s, p in zip(case.latent[1:], case.config.patch_size))
    return {"tokens": tokens, "ours": statistics.median(times["ours"]) * 1e3,
            "diffusers": statistics.median(times["diffusers"]) * 1e3, "rel_err": _rel_err(out, exact),
            "rel_err_diffusers": _rel_err(expected, exact),
            "ratio": statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))}


def _rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out - expected).abs().max() / expected.abs().max()).item()


def measure_memory(case: Case, device: torch.device, meter: PeakMemory, dtype: torch.dtype, attention: str
                   ) -> tuple[float, float]:
    run_ours, run_ref, _ = forwards(case, device, dtype, attention)
    with torch.no_grad():
        run_ours(), run_ref()  # warm-up: one-time buffers (kernels, RoPE tables) are not peaks
        return meter.measure(run_ours), meter.measure(run_ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model and config (median)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute of both models")
    parser.add_argument("--attention", choices=BACKENDS, default="sdpa", help="our attention backend")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cases = CASES if dtype == torch.float32 else CASES_BF16
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device} ({where}), {args.dtype}, our attention {args.attention}, {torch.get_num_threads()} CPU "
          f"threads, medians of {args.repeats} runs, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    results = [run_case(case, device, args.repeats, dtype, args.attention) for case in cases]
    meter = PeakMemory(device)  # after the timings: the fixed mmap threshold slows allocation-heavy code
    for case, result in zip(cases, results):
        result["mem_ours"], result["mem_diffusers"] = measure_memory(case, device, meter, dtype, args.attention)

    errors = "" if dtype == torch.float32 else f"{'err ours':>10}{'err diffusers':>15}"
    header = f"{'config':<30}{'tokens':>7}{'ours ms':>11}{'diffusers ms':>14}{'ratio':>7}" \
             f"{'peak MiB ours':>15}{'peak MiB diffusers':>20}{errors}"
    print(header)
    for case, r in zip(cases, results):
        errors = "" if dtype == torch.float32 else f"{r['rel_err']:>10.2e}{r['rel_err_diffusers']:>15.2e}"
        print(f"{case.name:<30}{r['tokens']:>7}{r['ours']:>11.1f}{r['diffusers']:>14.1f}"
              f"{r['ratio']:>7.3f}{r['mem_ours']:>15.1f}{r['mem_diffusers']:>20.1f}{errors}")
    max_ratio = max(r["ratio"] for r in results)
    max_rel_err = max(r["rel_err"] for r in results)
    if dtype != torch.float32:
        tol = bf16_tolerance(max(c.config.num_layers for c in cases))
        verdict = "within" if max_rel_err <= tol else "OVER"
        print(f"bf16 tolerance {tol:.2e}: ours {verdict} (diffusers' own bf16 error: "
              f"{max(r['rel_err_diffusers'] for r in results):.2e})")
    print(f"dit_forward: max_ratio={max_ratio:.3f} max_rel_err={max_rel_err:.2e}")


if __name__ == "__main__":
    main()
