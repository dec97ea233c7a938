# ruff: noqa: E402 (this file is gguf.py too: the path is set before the gguf package is imported)
"""GGUF weights: dequantisation speed and exactness per type, a DiT's forward time from GGUF against bf16, and the
memory a quantised 14B model holds.

    python benchmarks/gguf.py [--repeats 5] [--threads N]   # about 20 minutes with --repeats 3 on 2 CPU cores

Per ggml type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K):
- dequantisation of a [4096, 4096] weight with `sora.gguf.dequantize` (torch, float32 out), in GB/s of output,
  after a warm-up, the median of the repeats; and whether it equals gguf-py's numpy `dequantize` bit for bit (blocks
  from gguf-py's quantiser where it has one, random valid blocks for the K-quants);
- the forward time of a Wan 2.1 1.3B-shaped DiT (its widths, 2 of 30 blocks) whose block Linears are stored in
  that type (loaded through `load_dit` from a GGUF file written in city96's layout), against the same model loaded
  from bf16 safetensors, both computing in bf16 on the CPU: back-to-back pairs, the median ratio, at two clip sizes:
  17 frames at 192x416 (1,560 tokens) and 17 frames at 480x832 (7,800 tokens; 480p is the 1.3B's own resolution,
  and its 81-frame clips have 32,760 tokens). Dequantisation costs the
  same per forward whatever the clip, the products grow with the tokens: the ratio falls as the clip grows;
  and its output against its dequantised twin run in float32 through the safetensors path (max relative error).

Resident bytes: a Wan 2.1 T2V 14B built on the meta device (no memory) with its block Linears quantised, against
the same model in bf16; city96's Q4_K_M mix (v and ffn.2 in Q6_K) is printed too.

Last line: `gguf: types=N bitexact=yes|no max_rel_err=E slowdown=S resident=R` (S: the worst forward-time ratio
GGUF / bf16 over the K-quants and both clip sizes, the line before gives the worst per size; R: resident bytes of
the all-Q4_K 14B / its bf16 size).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _without_this_folder(path: list[str]) -> list[str]:
    return [p for p in path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


if __name__ == "gguf":
    # Another benchmark here runs as a script (benchmarks/ first on sys.path) and a library it uses (diffusers)
    # imported `gguf`, which found this file: hand it the real package instead (this module is then dropped).
    import importlib

    _saved, sys.path[:] = sys.path[:], _without_this_folder(sys.path)
    try:
        del sys.modules["gguf"]
        sys.modules["gguf"] = importlib.import_module("gguf")  # what the import statement hands over
    finally:
        sys.path[:] = _saved
else:  # run as the benchmark: the gguf package must not resolve to this file either
    import machine  # (benchmarks/machine.py, imported while this folder is still on the path)

    sys.path[:] = _without_this_folder(sys.path)
import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from sora import ops
from sora.dit import PRESETS, DiTConfig, WanDiT, load_dit
from sora.gguf import GGML_TYPES, dequantize, row_bytes
from sora.standins import random_k_blocks
from sora.streaming import module_bytes

CONFIG = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)
# clip -> latent [B, C, F, H, W]: 17 frames -> 5 latent frames, 8x spatial VAE, 2x2 patches
LATENTS = {"192x416": (1, 16, 5, 24, 52), "480x832": (1, 16, 5, 60, 104)}  # 1,560 and 7,800 tokens
BLOCK_LINEAR = (".self_attn.q.", ".self_attn.k.", ".self_attn.v.", ".self_attn.o.", ".cross_attn.q.",
                ".cross_attn.k.", ".cross_attn.v.", ".cross_attn.o.", ".ffn.0.", ".ffn.2.")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def blocks_for(qtype: int, array: np.ndarray, seed: int) -> np.ndarray:
    """The ggml blocks of `array` in `qtype`: gguf-py's quantiser, or random valid blocks for the K-quants."""
    name = GGML_TYPES[qtype].name
    if name in K_QUANTS:
        return random_k_blocks(qtype, array.shape[0], row_bytes(qtype, array.shape[1]), seed).numpy()
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType(qtype))


def dequant_speed(qtype: int, repeats: int) -> tuple[float, bool]:
    array = np.random.default_rng(qtype).standard_normal((4096, 4096)).astype(np.float32)
    blocks = blocks_for(qtype, array, qtype)
    data = torch.from_numpy(blocks.view(np.uint8).reshape(4096, -1).copy())
    ours = dequantize(data, qtype, array.shape)
    exact = bool(np.array_equal(ours.numpy().view(np.uint32), gguf.quants.dequantize(
        blocks, gguf.GGMLQuantizationType(qtype)).astype(np.float32).view(np.uint32)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dequantize(data, qtype, array.shape)
        times.append(time.perf_counter() - start)
    return ours.numel() * 4 / statistics.median(times) / 1e9, exact


def write_gguf(path: Path, state: dict[str, torch.Tensor], qtype: int) -> dict[str, torch.Tensor]:
    """The DiT in city96's layout with its block Linears in `qtype`; returns its dequantised state dict."""
    writer = gguf.GGUFWriter(str(path), arch="wan")
    twin = {}
    for n, (key, value) in enumerate(state.items()):
        array = value.float().numpy()
        if key.startswith("blocks.") and any(m in key for m in BLOCK_LINEAR) and key.endswith(".weight"):
            blocks = blocks_for(qtype, array, n)
            writer.add_tensor(key, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))
            twin[key] = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(qtype)).copy())
        else:
            writer.add_tensor(key, array)
            twin[key] = value.float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return twin


def paired(first, second, repeats: int) -> float:
    """Median ratio second / first of back-to-back timings (alternating order)."""
    ratios = []
    for i in range(repeats):
        order = (first, second) if i % 2 == 0 else (second, first)
        seconds = {}
        for call in order:
            start = time.perf_counter()
            call()
            seconds[call] = time.perf_counter() - start
        ratios.append(seconds[second] / seconds[first])
    return statistics.median(ratios)


def resident_ratio(mix: dict[str, int]) -> float:
    """Bytes of the 14B with its block Linears quantised (`mix`: module suffix -> type) / its bf16 bytes."""
    with torch.device("meta"):
        bf16 = WanDiT(PRESETS["wan21_t2v_14b"])
        quantised = WanDiT(PRESETS["wan21_t2v_14b"])
    ops.cast_weights(bf16, torch.bfloat16)
    for module in (bf16, quantised):  # everything else as city96 keeps it: bf16 / F16 (2 bytes)
        for p in module.parameters():
            p.data = torch.empty_like(p, dtype=torch.bfloat16, device="meta")
    for name, layer in quantised.named_modules():
        qtype = next((t for suffix, t in mix.items() if name.startswith("blocks.") and name.endswith(suffix)), None)
        if qtype is not None:
            ops.quantize(layer, qtype)
    return module_bytes(quantised) / module_bytes(bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = WanDiT(CONFIG).eval()
    torch.nn.init.normal_(base.head.head.weight, std=0.02)
    state = base.state_dict()
    gen = torch.Generator().manual_seed(1)
    xs = {clip: torch.randn(*shape, generator=gen) for clip, shape in LATENTS.items()}
    t, ctx = torch.tensor([600.0]), torch.randn(1, 64, 4096, generator=gen)
    x = xs["192x416"]

    print(f"cpu: {machine.cpu()}")
    folder = Path(tempfile.mkdtemp(prefix="sora_gguf_bench_"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(folder / "bf16.safetensors"))
    bf16 = load_dit(folder / "bf16.safetensors", compute_dtype=torch.bfloat16)
    forward = "".join(f" {'fwd/bf16 ' + clip:>17}" for clip in LATENTS)
    print(f"{'type':<6} {'dequant GB/s':>12} {'bit-exact':>9}{forward} {'max_rel_err':>12}", flush=True)
    exact_all, errors, slowdowns = True, [], {clip: {} for clip in LATENTS}
    with torch.no_grad():
        for qtype, info in GGML_TYPES.items():
            speed, exact = dequant_speed(qtype, args.repeats)
            exact_all &= exact
            ratios, error = {clip: float("nan") for clip in LATENTS}, float("nan")
            if info.name not in ("F32", "F16", "BF16"):
                twin_state = write_gguf(folder / f"{info.name}.gguf", state, qtype)
                quantised = load_dit(folder / f"{info.name}.gguf", compute_dtype=torch.bfloat16)
                for clip, xc in xs.items():
                    quantised(xc, t, ctx), bf16(xc, t, ctx)  # warm-up
                    ratios[clip] = paired(lambda xc=xc: bf16(xc, t, ctx),
                                          lambda xc=xc, model=quantised: model(xc, t, ctx), args.repeats)
                    if info.name in K_QUANTS:
                        slowdowns[clip][info.name] = ratios[clip]
                exact32 = load_dit(folder / f"{info.name}.gguf", compute_dtype=torch.float32)
                save_file({k: v.contiguous() for k, v in twin_state.items()}, str(folder / "twin.safetensors"))
                twin = load_dit(folder / "twin.safetensors", compute_dtype=torch.float32)
                expected = twin(x, t, ctx)
                error = float((exact32(x, t, ctx) - expected).abs().max() / expected.abs().max())
                errors.append(error)
                del quantised, exact32, twin
            row = "".join(f" {ratios[clip]:>17.3f}" for clip in LATENTS)
            print(f"{info.name:<6} {speed:>12.2f} {'yes' if exact else 'NO':>9}{row} {error:>12.2e}", flush=True)
    q4_k = resident_ratio({m.strip("."): 12 for m in BLOCK_LINEAR})
    q4_k_m = resident_ratio({**{m.strip("."): 12 for m in BLOCK_LINEAR}, "self_attn.v": 14, "cross_attn.v": 14,
                             "ffn.2": 14})
    print(f"\nWan 2.1 T2V 14B resident bytes / bf16: all-Q4_K {q4_k:.3f}, Q4_K_M mix {q4_k_m:.3f}")
    worst = {clip: max(s, key=s.get) for clip, s in slowdowns.items()}
    print("worst K-quant forward / bf16 (1.3B-shaped, 2 blocks, bf16 compute on the CPU, 17 frames): " + ", ".join(
        f"{clip} ({shape[2] * shape[3] * shape[4] // 4} tokens) {worst[clip]} {slowdowns[clip][worst[clip]]:.3f}"
        for clip, shape in LATENTS.items()))
    slowdown = max(s[worst[clip]] for clip, s in slowdowns.items())
    print(f"gguf: types={len(GGML_TYPES)} bitexact={'yes' if exact_all else 'no'} max_rel_err={max(errors):.2e} "
          f"slowdown={slowdown:.3f} resident={q4_k:.3f}")


if __name__ == "__main__":
    main()
