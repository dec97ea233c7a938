"""Several devices: a DiT forward split over 1 to 4 processes against the same forward in one process.

    python benchmarks/parallel.py [--device cpu|cuda] [--ranks 1,2,3,4] [--repeats 5] [--small]

Two models: the shipped nano DiT (4 heads) at its trained size (64x64, 33 frames), and a random Wan 2.1
1.3B-shaped DiT (its widths and 12 heads, 2 of its 30 blocks, float32) on 1,560 tokens. Each runs two calls: one
sample (the sequence split: Ulysses all-to-all where the heads divide the ranks, gathered keys and values where
they do not, as nano's 4 heads on 3 ranks) and a batched guided call (cond and uncond: the passes split, and the
sequence within each subgroup). Per row: the max |parallel − single| / max |single| (the single-process forward
computed in rank 0), the median time per forward after a warm-up (rank 0, between barriers), and the bytes rank 0
sends per forward for the splits (FSDP's weight gathers not counted). With 2 ranks or more, nano also runs with
its weights sharded (FSDP2). On CUDA the ranks are cuda:0..R-1 and the times give the scaling; on the CPU the
ranks share the machine's cores (the times then say little about scaling; the errors and bytes hold anywhere).

Last line: `parallel: ranks=R max_rel_err=E ulysses=yes fallback=yes cfg_parallel=yes fsdp=yes|no` (R: the most
ranks run; yes where that path ran and matched within 1e-5).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from sora import nano, parallel
from sora.dit import DiTConfig, WanDiT, load_dit
from sora.handle import ModelCall, ModelHandle
from sora.parallel_launch import launch

TOLERANCE = 1e-5
WAN_1_3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)
LATENTS = {"nano": (8, 9, 8, 8), "1.3B-shaped": (16, 5, 24, 52)}  # [C, T, H, W]: 144 and 1,560 tokens
SMALL = {"nano": (8, 3, 4, 4), "1.3B-shaped": (16, 2, 6, 8)}  # 12 and 24 tokens


def write_random_1_3b(path: Path, layers: int) -> Path:
    torch.manual_seed(0)
    model = WanDiT(DiTConfig(**{**WAN_1_3B.__dict__, "num_layers": layers}))
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # a fresh model's zero head would predict 0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def inputs(shape: tuple[int, ...], text_dim: int, guided: bool):
    gen = torch.Generator().manual_seed(1)
    batch = 2 if guided else 1
    x = torch.randn(batch, *shape, generator=gen)
    t = torch.full((batch,), 700.0)
    context = torch.randn(batch, 16, text_dim, generator=gen)
    call = ModelCall(0, 1, 0.7, ("cond", "uncond")) if guided else None
    return x, t, context, call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on_ranks(server, files: dict, latents: dict, repeats: int):
    """Every rank: each model and call, timed; rank 0 also the single-process forward and the bytes it sent."""
    ranks = server.ranks
    rows = []
    jobs = [(name, False) for name in files] + ([("nano", True)] if ranks.world > 1 else [])
    for name, sharded in jobs:
        model = load_dit(files[name], compute_dtype=torch.float32)
        handle = ModelHandle(parallel.shard_weights(model, ranks) if sharded else model)
        reference = ModelHandle(load_dit(files[name], compute_dtype=torch.float32)) if sharded else handle
        for guided in (False, True):
            x, t, context, call = inputs(latents[name], model.config.text_dim, guided)
            with torch.no_grad():
                out = ranks.forward(handle, "auto", x, t, context, call)  # warm-up
                before, paths = ranks.traffic.bytes_sent, (ranks.traffic.ulysses, ranks.traffic.gathered)
                times = []
                for _ in range(repeats):
                    if ranks.world > 1:
                        dist.barrier()  # every rank starts together
                    synchronize(ranks.device)
                    start = time.perf_counter()
                    ranks.forward(handle, "auto", x, t, context, call)
                    synchronize(ranks.device)
                    times.append(time.perf_counter() - start)
                sent = (ranks.traffic.bytes_sent - before) / repeats
                used = ("ulysses" if ranks.traffic.ulysses > paths[0] else
                        "gathered" if ranks.traffic.gathered > paths[1] else "-")
                error = 0.0
                if ranks.rank == 0 and ranks.world > 1:
                    expected = reference(x, t, context, call)
                    error = float((out.cpu() - expected.cpu()).abs().max() / expected.abs().max())
            rows.append({"model": name + (" (fsdp)" if sharded else ""), "call": "guided" if guided else "sample",
                         "attention": used if ranks.world > 1 else "-", "cfg": guided and ranks.world > 1,
                         "error": error, "ms": statistics.median(times) * 1e3, "sent": sent})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks", default="", help="comma-separated rank counts (default: 1,2,3,4 on the CPU; "
                                                    "1, 2 and 4 up to the GPU count on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="tiny latents and one block: checks the script runs")
    args = parser.parse_args()
    if args.ranks:
        counts = [int(n) for n in args.ranks.split(",")]
    elif args.device == "cuda":
        counts = [n for n in (1, 2, 4) if n <= torch.cuda.device_count()]
    else:
        counts = [1, 2, 3, 4]
    latents = SMALL if args.small else LATENTS

    with tempfile.TemporaryDirectory() as folder:
        files = {"nano": nano.dit_path(),
                 "1.3B-shaped": write_random_1_3b(Path(folder) / "wan_1_3b_shaped.safetensors",
                                                  1 if args.small else WAN_1_3B.num_layers)}
        results = {}
        for count in counts:
            devices = [f"cuda:{i}" for i in range(count)] if args.device == "cuda" else ["cpu"] * count
            results[count] = launch(",".join(devices), _on_ranks, (files, latents, args.repeats))

    print(f"{'model':<18} {'call':<7} {'ranks':>5} {'attention':<9} {'max_rel_err':>11} {'ms/forward':>11} "
          f"{'speed-up':>8} {'MB sent/rank':>12}")
    single = {(r["model"], r["call"]): r["ms"] for r in results.get(1, [])}
    flags = {"ulysses": False, "fallback": False, "cfg_parallel": False, "fsdp": False}
    errors = []
    for count, rows in results.items():
        for r in rows:
            base = single.get((r["model"].removesuffix(" (fsdp)"), r["call"]))
            speedup = f"{base / r['ms']:.2f}" if base else "-"
            print(f"{r['model']:<18} {r['call']:<7} {count:>5} {r['attention']:<9} {r['error']:>11.2e} "
                  f"{r['ms']:>11.1f} {speedup:>8} {r['sent'] / 2**20:>12.3f}")
            if count == 1:
                continue
            errors.append(r["error"])
            ok = r["error"] <= TOLERANCE
            flags["ulysses"] |= ok and r["attention"] == "ulysses"
            flags["fallback"] |= ok and r["attention"] == "gathered"
            flags["cfg_parallel"] |= ok and r["cfg"]
            flags["fsdp"] |= ok and r["model"].endswith("(fsdp)")
    yes = {k: "yes" if v else "no" for k, v in flags.items()}
    print(f"parallel: ranks={max(counts)} max_rel_err={max(errors, default=0.0):.2e} ulysses={yes['ulysses']} "
          f"fallback={yes['fallback']} cfg_parallel={yes['cfg_parallel']} fsdp={yes['fsdp']}")


if __name__ == "__main__":
    main()
