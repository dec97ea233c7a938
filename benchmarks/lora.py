"""LoRAs on the fly: every key layout read, its error against the hand merge, and the cost of an applied LoRA.

    python benchmarks/lora.py [--repeats 9] [--threads N]

A Wan 2.1 1.3B-shaped DiT (its widths, 2 of its 30 blocks, float32 on the CPU) gets one random rank-32 LoRA per
layout, on every Linear of the blocks and of the text / time embeddings and the head: original names with
`lora_down` / `lora_up` and alpha (ComfyUI, lightx2v), original `lora_A` / `lora_B`, kohya / musubi, Wan-Fun,
diffusers / PEFT under `transformer.` and under `base_model.model.`, and lightx2v's full deltas (`diff_b`, `diff`,
`diff_m`) beside a low-rank pair. For each: keys matched of the file, and the max |handle − merged| / max |merged|
of a forward through the model handle (the patches applied on the fly) against the same model with
`W + s·(up @ down)` merged into its weights by hand. Then the time of a forward with a rank-32 LoRA applied
against the bare model, back-to-back pairs after a warm-up, the ratio the median of the pairs' ratios.

Last line: `lora: layouts=N max_rel_err=E overhead=O unmatched=U` (O: applied / bare − 1; U: unmatched keys summed
over the layouts, all of which should match fully).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sora.dit import DiTConfig, WanDiT
from sora.handle import ModelHandle
from sora.lora import apply_lora, apply_to_state_dict, read_lora

CONFIG = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2)
LATENT = (1, 16, 5, 24, 52)  # 1,560 tokens (5 x 12 x 26 patches)
RANK = 32
BLOCK = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
         "cross_attn.o", "ffn.0", "ffn.2")
TOP = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
       "head.head")
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2", "text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}


def modules() -> list[str]:
    return [f"blocks.{i}.{m}" for i in range(CONFIG.num_layers) for m in BLOCK] + list(TOP)


def key_base(module: str, layout: str) -> str:
    """The file's name of a module in one layout."""
    if layout in ("kohya", "wan-fun"):
        return ("lora_unet__" if layout == "wan-fun" else "lora_unet_") + module.replace(".", "_")
    if layout in ("peft", "peft_base"):
        group, _, rest = module.partition(".") if module.startswith("blocks.") else ("", "", module)
        index, _, leaf = rest.partition(".")
        name = f"blocks.{index}.{DIFFUSERS[leaf]}" if group else DIFFUSERS[module]
        return ("transformer." if layout == "peft" else "base_model.model.") + name
    return "diffusion_model." + module


def lora_file(model: WanDiT, layout: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    down_up = ("lora_A", "lora_B") if layout in ("original_ab", "peft", "peft_base") else ("lora_down", "lora_up")
    for module in modules():
        out_dim, in_dim = model.get_submodule(module).weight.shape
        base = key_base(module, layout)
        sd[f"{base}.{down_up[0]}.weight"] = torch.randn(RANK, in_dim, generator=gen) / in_dim**0.5
        sd[f"{base}.{down_up[1]}.weight"] = 0.1 * torch.randn(out_dim, RANK, generator=gen) / RANK**0.5
        if layout in ("original", "kohya", "wan-fun", "full_deltas"):
            sd[f"{base}.alpha"] = torch.tensor(RANK / 2)
    if layout == "full_deltas":
        for key, value in model.state_dict().items():
            if key.endswith(".bias") and key.removesuffix(".bias") in modules():
                sd[f"diffusion_model.{key.removesuffix('.bias')}.diff_b"] = 0.01 * torch.randn(value.shape,
                                                                                               generator=gen)
            elif "norm" in key and key.endswith(".weight"):
                sd[f"diffusion_model.{key.removesuffix('.weight')}.diff"] = 0.01 * torch.randn(value.shape,
                                                                                               generator=gen)
            elif key.startswith("blocks.") and key.endswith("modulation"):
                sd[f"diffusion_model.{key.rsplit('.', 1)[0]}.diff_m"] = 0.01 * torch.randn(value.shape,
                                                                                           generator=gen)
    return sd


LAYOUTS = ("original", "original_ab", "kohya", "wan-fun", "peft", "peft_base", "full_deltas")


def merged(model: WanDiT, applied, strength: float) -> WanDiT:
    out = WanDiT(model.config).eval().requires_grad_(False)
    patches = {}
    for p in applied.patches:
        patches.setdefault(p.target, []).append(p.delta)
    out.load_state_dict(apply_to_state_dict(model.state_dict(), patches, strength))
    return out


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = WanDiT(CONFIG).eval().requires_grad_(False)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    gen = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(*LATENT, generator=gen), torch.tensor([600.0]), torch.randn(1, 64, 4096, generator=gen)

    errors, unmatched_total = [], 0
    print(f"{'layout':<14} {'keys':>12} {'layout read':>14} {'max_rel_err':>12}")
    with torch.no_grad():
        for n, layout in enumerate(LAYOUTS):
            lora = read_lora(lora_file(model, layout, seed=10 + n))
            applied = apply_lora(lora, model, 0.8)
            unmatched_total += len(applied.unmatched)
            ours = ModelHandle(model).patched(*applied.patches)(x, t, ctx)
            expected = merged(model, applied, 0.8)(x, t, ctx)
            error = float((ours - expected).abs().max() / expected.abs().max())
            errors.append(error)
            print(f"{layout:<14} {applied.matched_keys:>5} / {applied.total_keys:<5} {lora.layout:>14} "
                  f"{error:>12.2e}", flush=True)

        bare = ModelHandle(model)
        patched = bare.patched(*apply_lora(read_lora(lora_file(model, "original", seed=99)), model, 1.0).patches)
        for call in (bare, patched):  # warm-up
            call(x, t, ctx)
        ratios, times = [], {"bare": [], "lora": []}
        for i in range(args.repeats):
            order = [("bare", bare), ("lora", patched)] if i % 2 == 0 else [("lora", patched), ("bare", bare)]
            pair = {name: timed(lambda call=call: call(x, t, ctx)) for name, call in order}
            ratios.append(pair["lora"] / pair["bare"])
            for name, seconds in pair.items():
                times[name].append(seconds)
    overhead = statistics.median(ratios) - 1.0
    print(f"\nforward, 1.3B-shaped {CONFIG.num_layers} blocks, {LATENT[2] * LATENT[3] * LATENT[4] // 4} tokens, "
          f"rank-{RANK} LoRA on {len(modules())} Linears, applied on the fly:")
    print(f"  bare {statistics.median(times['bare']) * 1e3:.0f} ms   with LoRA "
          f"{statistics.median(times['lora']) * 1e3:.0f} ms   overhead {overhead:+.3f}")
    print(f"lora: layouts={len(LAYOUTS)} max_rel_err={max(errors):.2e} overhead={overhead:.3f} "
          f"unmatched={unmatched_total}")


if __name__ == "__main__":
    main()
