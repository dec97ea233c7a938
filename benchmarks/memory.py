"""Block streaming of a 1.3B-shaped Wan DiT under memory budgets of 100%, 50% and 25% of its weight size.

    python benchmarks/memory.py [--layers 30] [--repeats 2] [--threads N] [--frames 1] [--size 16]

The model has Wan 2.1 T2V-1.3B's shape (dim 1536, FFN 8960, 12 heads, 30 layers by default) with random bf16
weights and bf16 compute, on the compute device the manager picks (CUDA when present, else the CPU, where streamed
blocks are real copies out of the offload store). For each budget a fresh `MemoryManager` plans the model from the
call's token count: blocks resident, the rest streamed with a two-block window. The table shows the blocks
resident, the peak bytes of weights the manager placed on the compute device (streamed blocks in flight included),
the activations it planned for, the time per forward (median over --repeats after a warm-up call), the time of
a fully resident copy of the model (no manager) run back to back with it, the median ratio of those pairs (load
from other processes on a shared machine drifts over seconds and hits both sides of a pair alike), and whether the
output is bit-identical to the fully resident model's.

The last line reads `memory: within_budget=yes|no identical=yes|no`: within_budget when, for every budget, the
peak placed weights plus the planned activations stay within it; identical when every output equals the resident
one bit for bit.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from sora import memory
from sora.dit import DiTConfig, WanDiT
from sora.memory import MemoryManager, MemoryOptions
from sora.streaming import module_bytes

FRACTIONS = (1.0, 0.5, 0.25)
GiB, MiB = 2**30, 2**20


def build(layers: int) -> WanDiT:
    """The 1.3B's shape with random weights, stored in bf16 from the start (no float32 copy of 1.4B parameters)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = WanDiT(DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=layers))
    finally:
        torch.set_default_dtype(default)
    nn.init.normal_(model.head.head.weight, std=0.02)  # a fresh Wan head is zero: make the output depend on all
    model.set_compute(dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def timed(model: WanDiT, inputs: tuple) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = model(*inputs)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--frames", type=int, default=1, help="latent frames")
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args.layers)
    resident = copy.deepcopy(model)  # the fully resident baseline, run back to back with the managed model
    weights = module_bytes(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, args.frames, args.size, args.size, generator=generator)
    inputs = (x, torch.tensor([700.0]), torch.randn(1, 64, 4096, generator=generator))
    device = MemoryManager().compute_device
    tokens = args.frames * (args.size // 2) ** 2
    print(f"1.3B-shaped DiT: {args.layers} layers, {weights / GiB:.2f} GiB of bf16 weights; {tokens} tokens; "
          f"device {device}; {torch.get_num_threads()} threads; {args.repeats} timed pairs per row")

    resident.to(device)
    resident_inputs = tuple(t.to(device) for t in inputs)
    reference = resident(*resident_inputs).cpu()
    rows, within, identical = [], True, True
    for fraction in FRACTIONS:
        budget = int(fraction * weights)
        manager = MemoryManager(MemoryOptions(budget_bytes=budget))
        manager.register(model)
        activations = memory.dit_call_activation_bytes(model, inputs, {})
        out = model(*inputs)  # warm-up: places the model and starts streaming
        managed_times, resident_times = [], []
        for _ in range(args.repeats):
            resident_times.append(timed(resident, resident_inputs)[1])
            out, seconds = timed(model, inputs)
            managed_times.append(seconds)
        placement = manager.state(model)
        peak = manager.peak_placed_bytes
        same = torch.equal(out, reference)
        fits = peak + activations <= budget
        within, identical = within and fits, identical and same
        ratio = statistics.median(m / r for m, r in zip(managed_times, resident_times))
        rows.append((f"{fraction:.0%} ({budget / GiB:.2f} GiB)", f"{placement.blocks_resident}/{args.layers}",
                     f"{peak / GiB:.3f}", f"{activations / MiB:.1f}", f"{statistics.median(managed_times):.2f}",
                     f"{statistics.median(resident_times):.2f}", f"{ratio:.2f}", "yes" if same else "no"))
        manager.close()

    header = ("budget", "blocks resident", "peak placed GiB", "activations MiB", "s/forward", "resident s/forward",
              "ratio", "identical")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print(f"memory: within_budget={'yes' if within else 'no'} identical={'yes' if identical else 'no'}")


if __name__ == "__main__":
    main()
