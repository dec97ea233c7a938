"""Decode speed and working memory of `sora.vae.WanVAE` against diffusers' `AutoencoderKLWan`, same weights.

    python benchmarks/vae_decode.py [--repeats 5] [--threads N]   (default: torch's thread count)
    python benchmarks/vae_decode.py --check-estimate   (the tiling planner's memory estimate against measurements)

Model: the Wan 2.1 layout at base width 16 (stage widths 16/32/64/64, z_dim 16; the real VAE has 96), random
weights from seed 0, decoding 17, 33, 65 and 129 frames of 64 x 64 pixels (a 5 / 9 / 17 / 33 x 8 x 8 latent).
Both run untiled, float32, with the same number of torch threads.

Time: in this process, after one short warm-up decode each, ours and diffusers run back to back on the same latent,
`--repeats` pairs per length, alternating which goes first; the table gives each one's median wall time, and as
`ratio` the median over the pairs of (ours / diffusers), which cancels slow changes in the load of a shared machine.

Memory: for each case a fresh subprocess builds the model and the latent, warms up with a 2-latent-frame decode (so
code pages and thread pools are resident), calls glibc's malloc_trim(0) (freed heap goes back to the OS, so RSS is
live memory), resets the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs), reads RSS as the baseline,
decodes once and reads the kernel's peak (VmHWM): exact, no sampling gaps. Working memory = peak - baseline - the
bytes of the decoded frames: everything the decode allocates beyond its result (activations, causal caches, im2col
buffers, and for diffusers the growing concatenation of frames and its clamped copy).
The subprocesses pin glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_=65536, for both implementations), so that
every block above 64 KiB is returned to the OS when freed and RSS tracks live memory. With glibc's adaptive default,
freed blocks can stay in the heap, and RSS also carries fragmentation that depends on the order of frees (+-20% run
to run here); that figure is printed too ("adaptive"), for ours. `est` is `WanVAE.working_bytes`, the estimate the
tiling planner uses. Linux with glibc only (reads /proc, calls malloc_trim).

Error: max |ours - diffusers| / max |diffusers| over the decoded frames of the last timed run.

Last line: `vae_decode: memory_growth=G max_ratio=R max_rel_err=E`, G = our working memory at 129 frames / at 17
(pinned threshold), R = the largest time ratio, E = the largest error.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

FRAMES = (17, 33, 65, 129)
LATENT_HW = (8, 8)
BASE_DIM = 16
Z_DIM = 16


def build(seed: int = 0):
    """(diffusers model, our model) with the same random weights."""
    from diffusers import AutoencoderKLWan

    from sora.checkpoints import load_into
    from sora.vae import WanVAE, detect_vae_config, to_original_layout

    torch.manual_seed(seed)
    ref = AutoencoderKLWan(base_dim=BASE_DIM, z_dim=Z_DIM).eval()
    with torch.no_grad():  # gains near 1, small biases, unit-variance convs: outputs mostly inside the clamp
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    state_dict = to_original_layout({k: v.clone() for k, v in ref.state_dict().items()})
    ours = WanVAE(detect_vae_config(state_dict))
    load_into(ours, state_dict, what="Wan VAE")
    return ref, ours.eval().requires_grad_(False)


def latent(frames: int) -> torch.Tensor:
    return torch.randn(1, Z_DIM, (frames - 1) // 4 + 1, *LATENT_HW, generator=torch.Generator().manual_seed(frames))


def decode(impl: str, model, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(z) if impl == "ours" else model.decode(z).sample


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_working_memory(run, warm_up) -> dict:
    """Peak RSS of `run()` above the baseline, minus the bytes of its result (see the module docstring)."""
    warm_up()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_kib("VmRSS") * 1024
    out = run()
    peak = _status_kib("VmHWM") * 1024
    output = out.numel() * out.element_size()
    return {"working": peak - baseline - output, "output": output}


def measure_memory(impl: str, frames: int) -> dict:
    """Run in a fresh process: working memory of one decode of `frames` frames."""
    ref, ours = build()
    model = ours if impl == "ours" else ref
    z = latent(frames)
    return peak_working_memory(lambda: decode(impl, model, z), lambda: decode(impl, model, latent(5)[:, :, :2]))


# (name, VAEConfig fields or None for the real 2.1 VAE, latent height = width, encode)
ESTIMATE_CASES = [
    ("2.1 width 16, 8x8, decode", dict(base_dim=16, decoder_base_dim=16, z_dim=16), 8, False),
    ("2.1 width 16, 16x16, decode", dict(base_dim=16, decoder_base_dim=16, z_dim=16), 16, False),
    ("2.1 width 32, 8x8, decode", dict(base_dim=32, decoder_base_dim=32, z_dim=16), 8, False),
    ("2.1 real VAE, 8x8, decode", None, 8, False),
    ("2.2 width 16/24, 8x8, decode", dict(base_dim=16, decoder_base_dim=24, z_dim=16, patch_size=2,
                                          residual_shortcuts=True), 8, False),
    ("2.1 width 16, 8x8, encode", dict(base_dim=16, decoder_base_dim=16, z_dim=16), 8, True),
    ("2.1 width 16, 16x16, encode", dict(base_dim=16, decoder_base_dim=16, z_dim=16), 16, True),
    ("2.2 width 16/24, 8x8, encode", dict(base_dim=16, decoder_base_dim=24, z_dim=16, patch_size=2,
                                          residual_shortcuts=True), 8, True),
]


def measure_estimate_case(index: int) -> dict:
    """Run in a fresh process: measured and estimated working memory of one `ESTIMATE_CASES` entry (3 chunks)."""
    from sora.vae import VAEConfig, WanVAE

    _, fields, size, encode = ESTIMATE_CASES[index]
    torch.manual_seed(0)
    model = WanVAE(VAEConfig(**fields) if fields else VAEConfig.wan21()).eval().requires_grad_(False)
    s = model.config.spatial_factor
    if encode:
        x = torch.rand(1, 3, 9, size * s, size * s) * 2 - 1
        result = peak_working_memory(lambda: model.encode(x), lambda: model.encode(x[:, :, :5]))
    else:
        z = torch.randn(1, model.config.z_dim, 3, size, size)
        result = peak_working_memory(lambda: model.decode(z), lambda: model.decode(z[:, :, :2]))
    return dict(result, estimate=model.working_bytes(size, size, encode=encode))


def in_subprocess(args: list[str], threads: int, pinned: bool = True) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if pinned else {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)],
                            capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_in_subprocess(impl: str, frames: int, threads: int, pinned: bool = True) -> dict:
    return in_subprocess(["--memory", impl, str(frames)], threads, pinned)


def check_estimate(threads: int) -> None:
    """Print measured working memory against `WanVAE.working_bytes` for `ESTIMATE_CASES` (random weights):
    live memory (pinned malloc threshold) and what a default process holds (adaptive), each over the estimate."""
    print(f"{'case':>30} {'live':>7} {'adaptive':>8} {'estimate':>8} {'live/est':>8} {'adapt/est':>9}   "
          f"MiB, {threads} threads")
    for index, (name, *_) in enumerate(ESTIMATE_CASES):
        live = in_subprocess(["--estimate-case", str(index)], threads)
        adaptive = in_subprocess(["--estimate-case", str(index)], threads, pinned=False)
        estimate = live["estimate"]
        print(f"{name:>30} {live['working'] / 2 ** 20:>7.1f} {adaptive['working'] / 2 ** 20:>8.1f} "
              f"{estimate / 2 ** 20:>8.1f} {live['working'] / estimate:>8.2f} {adaptive['working'] / estimate:>9.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--check-estimate", action="store_true",
                        help="instead: measured working memory against the tiling planner's estimate")
    parser.add_argument("--memory", nargs=2, metavar=("IMPL", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--estimate-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(measure_memory(args.memory[0], int(args.memory[1]))))
        return
    if args.estimate_case is not None:
        print(json.dumps(measure_estimate_case(args.estimate_case)))
        return
    if args.check_estimate:
        check_estimate(args.threads)
        return

    load = os.getloadavg()[0]
    if args.threads > 1 and load > 0.5:
        print(f"note: load average {load:.1f} before starting: other processes use the CPU, and multi-threaded "
              "timings then measure the scheduler (threads waiting for each other) more than the code; "
              "rerun on an idle machine or with --threads 1")
    models = dict(zip(("diffusers", "ours"), build(), strict=True))
    for impl, model in models.items():
        decode(impl, model, latent(5)[:, :, :2])
    mib = 2 ** 20
    print(f"Wan 2.1 layout, base_dim {BASE_DIM}, z_dim {Z_DIM}, {LATENT_HW[0] * 8}x{LATENT_HW[1] * 8} px, "
          f"float32, {args.threads} threads, median of {args.repeats}; memory in MiB")
    print(f"{'frames':>6} {'ours s':>8} {'diff s':>8} {'ratio':>6} {'rel err':>9} {'output':>7} {'ours':>7} "
          f"{'adaptive':>8} {'est':>6} {'diffusers':>9}")
    ratios, errors, working, adaptive = [], [], {}, {}
    for frames in FRAMES:
        z = latent(frames)
        times = {"ours": [], "diffusers": []}
        outputs = {}
        for repeat in range(args.repeats):
            for impl in ("ours", "diffusers")[:: 1 if repeat % 2 == 0 else -1]:
                start = time.perf_counter()
                outputs[impl] = decode(impl, models[impl], z)
                times[impl].append(time.perf_counter() - start)
        t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        ratio = statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"], strict=True))
        error = ((outputs["ours"] - outputs["diffusers"]).abs().max() / outputs["diffusers"].abs().max()).item()
        ours = memory_in_subprocess("ours", frames, args.threads)
        working[frames] = ours["working"]
        adaptive[frames] = memory_in_subprocess("ours", frames, args.threads, pinned=False)["working"]
        reference = memory_in_subprocess("diffusers", frames, args.threads)["working"]
        ratios.append(ratio)
        errors.append(error)
        print(f"{frames:>6} {t_ours:>8.2f} {t_ref:>8.2f} {ratio:>6.3f} {error:>9.2e} "
              f"{ours['output'] / mib:>7.1f} {working[frames] / mib:>7.1f} {adaptive[frames] / mib:>8.1f} "
              f"{models['ours'].working_bytes(*LATENT_HW) / mib:>6.1f} {reference / mib:>9.1f}", flush=True)
    first, last = FRAMES[0], FRAMES[-1]
    print(f"adaptive malloc: memory_growth={adaptive[last] / adaptive[first]:.3f}")
    print(f"vae_decode: memory_growth={working[last] / working[first]:.3f} max_ratio={max(ratios):.3f} "
          f"max_rel_err={max(errors):.2e}")


if __name__ == "__main__":
    main()
