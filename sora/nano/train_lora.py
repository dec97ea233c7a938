"""Training a LoRA on the shipped nano DiT that teaches it a colour outside its eight: black.

    python -m sora.nano.train_lora --out sora/nano/weights/nano_black_lora.safetensors [--steps N] [--rank R]
        [--threads 2]

The shipped DiT never saw a black object (its captions use "black" only for the backdrop); with the LoRA at strength
1, "a black square moving up" makes one. Magenta, the first choice, cannot be taught to the DiT: the shipped nano
VAE decodes every colour it was not trained on as one of its eight (magenta comes back red, measured on 24 clips),
so no latent the encoder makes shows magenta. Black is the colour of the dark background, which it renders.

1. Data, built once per run: `new_clips` generator clips of the new colour (on the gray background: the VAE
   decodes small black objects on the light one as purple) with two full captions each; `replay_clips` ordinary
   clips (the shipped DiT's own training clips and captions, `train_dit.SEED_BASE` on) and `backdrop_clips` on the
   dark background captioned "... against a black backdrop" (the base model's other use of the word); encoded by
   the shipped nano VAE and normalised with its latent statistics, captions encoded by MiniLM as `train_dit` does.
2. Training. The DiT is frozen; the LoRA's factors (`sora.lora.LowRank` patches of every attention and FFN Linear
   of the blocks and of the text embedding, `down` random, `up` zero, so it starts as the base model) are the only
   parameters. Every step runs a fresh `ModelHandle(dit).patched(...)` of them, the way the nodes apply a LoRA,
   on one batch of new-colour clips and one of replay clips (`train_dit.training_batch`, `train_dit.flow_loss`,
   the batch kinds and noise levels of the shipped run); the loss is their sum, the replay weighted by
   `replay_weight`, so that the eight colours and the backdrop stay as they were.
   New-colour captions are never dropped (the unconditional model stays the base model's, trained on replay).
3. The factors are saved in the original LoRA layout (`diffusion_model.<module>.lora_down.weight`,
   `.lora_up.weight`, `.alpha`) with `sora.*` metadata naming the trigger word; `sora.lora.read_lora` and
   `apply_lora` read it like any other Wan LoRA.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..dit import WanDiT, load_dit
from ..handle import ModelHandle, WeightPatch
from ..latent_formats import LatentFormat
from ..lora import LowRank
from ..text import TextEncoder, load_minilm
from ..vae import WanVAE, load_vae
from . import data, dit_path, judge, shipped_latent_format, vae_path
from . import vocabulary as vocab
from .pipeline import NanoPipeline
from .train_dit import SEED_BASE, DiTTrainConfig, caption_variants, encode_captions, flow_loss, training_batch

NEW_SEED_BASE = 40_000_000  # new-colour clip seeds (the DiT's training clips lie at 20M, its evaluation at 30M)
BACKDROP_SEED_BASE = 41_000_000
BACKDROP = "against a black backdrop"
# The attention and FFN Linears of every block, and the text embedding: where a word's meaning enters.
BLOCK_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
TOP_TARGETS = ("text_embedding.0", "text_embedding.2")
PHRASE = {"right": "moving to the right", "left": "moving to the left", "up": "moving up", "down": "moving down"}


@dataclass(frozen=True)
class LoraTrainConfig:
    color: str = "black"  # a key of vocabulary.EXTRA_COLORS: the trigger word
    background: str = "gray"  # the new colour's clips are all on it
    rank: int = 8
    alpha: float = 8.0  # scale alpha / rank = 1
    block_targets: tuple[str, ...] = BLOCK_TARGETS  # in every block
    top_targets: tuple[str, ...] = TOP_TARGETS
    new_clips: int = 128
    replay_clips: int = 256
    # Replay clips on the dark background captioned "... against a black backdrop", the base model's other use of
    # the word, so that the LoRA learns to tell the object's colour from the backdrop's.
    backdrop_clips: int = 128
    frames: int = 33
    size: int = 64
    batch: int = 8  # new-colour clips per step
    # Replay clips per step. Measured (600 steps, benchmark's 32 text-to-video prompts): with 8, colour 0.91 and
    # direction 1.00 against the base model's 0.94 and 1.00, one "purple" prompt made black; with 16, 1.00 and 1.00.
    replay_batch: int = 16
    steps: int = 600
    lr: float = 2e-3
    warmup: int = 20
    replay_weight: float = 1.0
    # Batch kinds and noise as the shipped DiT was trained (`DiTTrainConfig`), without the focus phase.
    dit: DiTTrainConfig = DiTTrainConfig(focus=())


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------

def new_color_clip(cfg: LoraTrainConfig, index: int) -> data.Clip:
    return data.make_clip(NEW_SEED_BASE + index, cfg.frames, cfg.size, cfg.size, color=cfg.color,
                          background=cfg.background)


def replay_clip(cfg: LoraTrainConfig, index: int) -> data.Clip:
    return data.make_clip(SEED_BASE + index, cfg.frames, cfg.size, cfg.size)


def coverage(clips: list[data.Clip], spatial: int, temporal: int) -> torch.Tensor:
    """[clips, T, h, w] float16: the share of the pixels behind each latent cell that show the object."""
    out = []
    for clip in clips:
        on_object = data.object_pixels(clip)
        first, rest = on_object[:1], on_object[1:].unflatten(0, (-1, temporal)).mean(dim=1)
        out.append(torch.nn.functional.avg_pool2d(torch.cat([first, rest]), spatial).half())
    return torch.stack(out)


def build_dataset(clips: list[data.Clip], captions: list[str], vae: WanVAE, fmt: LatentFormat,
                  encoder: TextEncoder, text_len: int) -> dict:
    """The `train_dit.training_batch` dataset of `clips` with len(captions) / len(clips) captions each."""
    latents = []
    with torch.inference_mode():
        for i in range(0, len(clips), 16):
            videos = torch.stack([c.video for c in clips[i:i + 16]])
            latents.append(fmt.normalize(vae.encode(videos)).half())
    s, t = vae.config.spatial_factor, vae.config.temporal_factor
    return {"latents": torch.cat(latents), "context": encode_captions(encoder, captions, text_len).half(),
            "empty": encode_captions(encoder, [""], text_len), "object": coverage(clips, s, t)}


def new_color_captions(clip: data.Clip, seed: int) -> list[str]:
    """Two full captions of the clip: never the direction phrase alone, which names no colour."""
    return caption_variants(clip, seed, 3)[:2]


def backdrop_clip(cfg: LoraTrainConfig, index: int) -> data.Clip:
    return data.make_clip(BACKDROP_SEED_BASE + index, cfg.frames, cfg.size, cfg.size, background="dark")


def backdrop_captions(clip: data.Clip, seed: int, count: int) -> list[str]:
    """`count` generator captions of a dark-background clip that end in BACKDROP (the first found of each)."""
    out, k = [], 0
    while len(out) < count:
        caption = data.write_caption(clip.scene, random.Random(f"{seed}/backdrop/{k}"))
        if caption.endswith(BACKDROP) and caption not in out:
            out.append(caption)
        k += 1
    return out


# ------------------------------------------------------------------------------------------------------------------
# The LoRA
# ------------------------------------------------------------------------------------------------------------------

def target_modules(dit: WanDiT, cfg: LoraTrainConfig) -> list[str]:
    """The module paths the LoRA patches."""
    return [f"blocks.{i}.{m}" for i in range(len(dit.blocks)) for m in cfg.block_targets] + list(cfg.top_targets)


def init_factors(dit: WanDiT, modules: list[str], rank: int, generator: torch.Generator
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (down [rank, in], up [out, rank])}, trainable: down ~ U(±1/sqrt(in)) (PEFT's default), up zero."""
    factors = {}
    for path in modules:
        out_features, in_features = dit.get_submodule(path).weight.shape
        bound = 1 / math.sqrt(in_features)
        down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        factors[path] = (down.requires_grad_(), torch.zeros(out_features, rank, requires_grad=True))
    return factors


def patches(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, strength: float = 1.0,
            source: str = "lora training") -> tuple[WeightPatch, ...]:
    """One `WeightPatch` of a `LowRank` per module, on its weight."""
    return tuple(WeightPatch(f"{path}.weight", LowRank(down, up, alpha), strength, source)
                 for path, (down, up) in factors.items())


def save_lora(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, path: Path,
              metadata: dict[str, str]) -> None:
    """Write the factors in the original layout (`diffusion_model.<module>.lora_down.weight`, ...), float32."""
    tensors = {}
    for module, (down, up) in factors.items():
        key = f"diffusion_model.{module}"
        tensors[f"{key}.lora_down.weight"] = down.detach().float().contiguous()
        tensors[f"{key}.lora_up.weight"] = up.detach().float().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------

def new_color_prompts(color: str, count: int = 16) -> list[str]:
    """`count` bare prompts asking for `color`: every shape with every direction in turn."""
    shapes, directions = sorted(vocab.SHAPES), sorted(vocab.DIRECTIONS)
    return [f"{data._article(color)} {color} {shapes[i % 3]} {PHRASE[directions[(i + i // 12) % 4]]}"
            for i in range(count)]


def new_color_rate(pipeline: NanoPipeline, color: str, count: int = 16, frames: int = 33, seed: int = 0) -> float:
    """Share of `new_color_prompts` clips (text-to-video, the nano defaults) in which the judge reads `color`."""
    prompts = new_color_prompts(color, count)
    hits = 0
    for i in range(0, count, 8):
        videos = pipeline.decode(pipeline.text_to_latent(prompts[i:i + 8], seed=seed + i, frames=frames))
        hits += sum(judge.judge_video(v).color == color for v in videos)
    return hits / count


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------

def learning_rate(cfg: LoraTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def prepare_data(cfg: LoraTrainConfig, vae: WanVAE, fmt: LatentFormat, encoder: TextEncoder, text_len: int
                 ) -> tuple[dict, dict]:
    """The new-colour and the replay datasets (see the module docstring)."""
    new = [new_color_clip(cfg, i) for i in range(cfg.new_clips)]
    new_captions = [c for i, clip in enumerate(new) for c in new_color_captions(clip, NEW_SEED_BASE + i)]
    count = cfg.dit.captions_per_clip
    replay = [replay_clip(cfg, i) for i in range(cfg.replay_clips)]
    replay_captions = [c for i, clip in enumerate(replay) for c in caption_variants(clip, SEED_BASE + i, count)]
    backdrop = [backdrop_clip(cfg, i) for i in range(cfg.backdrop_clips)]
    replay += backdrop
    replay_captions += [c for i, clip in enumerate(backdrop) for c in backdrop_captions(clip, BACKDROP_SEED_BASE + i,
                                                                                       count)]
    return (build_dataset(new, new_captions, vae, fmt, encoder, text_len),
            build_dataset(replay, replay_captions, vae, fmt, encoder, text_len))


def fit(cfg: LoraTrainConfig, dit: WanDiT, new_data: dict, replay_data: dict
        ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[tuple[float, float]]]:
    """Train the LoRA's factors on the frozen `dit`; returns them and the (new, replay) loss of every step."""
    new_cfg = dataclasses.replace(cfg.dit, batch=cfg.batch, captions_per_clip=2, text_dropout=0.0)
    replay_cfg = dataclasses.replace(cfg.dit, batch=cfg.replay_batch)
    generator = torch.Generator().manual_seed(0)
    factors = init_factors(dit, target_modules(dit, cfg), cfg.rank, generator)
    parameters = [t for pair in factors.values() for t in pair]
    print(f"LoRA: {len(factors)} modules, rank {cfg.rank}, {sum(p.numel() for p in parameters):,} parameters",
          flush=True)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)
    base = ModelHandle(dit, "nano_dit")
    history: list[tuple[float, float]] = []
    cpu_started, started = time.process_time(), time.time()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        # a fresh handle per step: a handle keeps the factors it bound (sora.ops.BoundPatch caches them)
        model = base.patched(*patches(factors, cfg.alpha))
        x0, sigma, context, cells = training_batch(new_data, new_cfg, generator)
        new_loss = flow_loss(model, x0, sigma, context, generator, cells)
        x0, sigma, context, cells = training_batch(replay_data, replay_cfg, generator)
        replay_loss = flow_loss(model, x0, sigma, context, generator, cells)
        loss = new_loss + cfg.replay_weight * replay_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        history.append((new_loss.item(), replay_loss.item()))
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            new_mean, replay_mean = _mean(history[-25:])
            print(f"step {step + 1} new {new_mean:.4f} replay {replay_mean:.4f} lr {learning_rate(cfg, step):.2e} "
                  f"{time.process_time() - cpu_started:.0f} CPU-s {time.time() - started:.0f} s", flush=True)
    return factors, history


def _mean(history: list[tuple[float, float]]) -> tuple[float, float]:
    return sum(h[0] for h in history) / len(history), sum(h[1] for h in history) / len(history)


def train(cfg: LoraTrainConfig, out: Path, evaluate: bool = True) -> dict[str, float]:
    """Train the LoRA on the shipped DiT, write it to `out` and return its figures (CPU seconds of the whole run,
    data included, the final losses, and with `evaluate` the new-colour rate of 16 prompts with and without it)."""
    if cfg.color not in vocab.EXTRA_COLORS:
        raise ValueError(f"{cfg.color!r} is not a colour of vocabulary.EXTRA_COLORS")
    cpu_started, started = time.process_time(), time.time()
    dit = load_dit(dit_path(), compute_dtype=torch.float32)
    vae = load_vae(vae_path(), dtype=torch.float32)
    encoder = load_minilm()
    new_data, replay_data = prepare_data(cfg, vae, shipped_latent_format(), encoder, dit.config.text_len)
    print(f"data: {cfg.new_clips} {cfg.color} clips, {cfg.replay_clips} replay clips, "
          f"{time.process_time() - cpu_started:.0f} CPU-s", flush=True)
    factors, history = fit(cfg, dit, new_data, replay_data)
    cpu_seconds = time.process_time() - cpu_started
    new_loss, replay_loss = _mean(history[-25:])
    figures = {"cpu_seconds": round(cpu_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "new_loss": round(new_loss, 4), "replay_loss": round(replay_loss, 4)}
    metadata = {"sora.family": "nano", "sora.kind": "lora", "sora.trigger": cfg.color,
                "sora.teaches": f"the colour {cfg.color} {vocab.EXTRA_COLORS[cfg.color]} for objects "
                                f"(prompt: 'a {cfg.color} circle moving up')",
                "sora.recommended_strength": "1.0", "sora.base": dit_path().name,
                "sora.train_config": json.dumps(dataclasses.asdict(cfg)), "sora.train": json.dumps(figures)}
    save_lora(factors, cfg.alpha, out, metadata)
    print(f"wrote {out} ({out.stat().st_size:,} bytes), {cpu_seconds:.0f} CPU-s in all", flush=True)
    if evaluate:
        base = ModelHandle(dit, "nano_dit")
        pipeline = NanoPipeline(dit=base.patched(*patches(factors, cfg.alpha)), vae=vae, encoder=encoder)
        figures["rate_with"] = new_color_rate(pipeline, cfg.color)
        figures["rate_without"] = new_color_rate(dataclasses.replace(pipeline, dit=dit), cfg.color)
        print(f"{cfg.color} read in {figures['rate_with']:.2f} of 16 prompts with the LoRA, "
              f"{figures['rate_without']:.2f} without", flush=True)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=LoraTrainConfig.steps)
    parser.add_argument("--rank", type=int, default=LoraTrainConfig.rank, help="LoRA rank (alpha = rank)")
    parser.add_argument("--lr", type=float, default=LoraTrainConfig.lr, help="peak learning rate")
    parser.add_argument("--new-clips", type=int, default=LoraTrainConfig.new_clips)
    parser.add_argument("--replay-clips", type=int, default=LoraTrainConfig.replay_clips)
    parser.add_argument("--backdrop-clips", type=int, default=LoraTrainConfig.backdrop_clips,
                        help="replay clips captioned 'against a black backdrop'")
    parser.add_argument("--batch", type=int, default=LoraTrainConfig.batch, help="new-colour clips per step")
    parser.add_argument("--replay-batch", type=int, default=LoraTrainConfig.replay_batch, help="replay clips per step")
    parser.add_argument("--replay-weight", type=float, default=LoraTrainConfig.replay_weight)
    parser.add_argument("--no-eval", action="store_true", help="skip the 16-prompt evaluation at the end")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (more than the free cores slows it down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = LoraTrainConfig(steps=args.steps, rank=args.rank, alpha=float(args.rank), lr=args.lr,
                          new_clips=args.new_clips, replay_clips=args.replay_clips,
                          backdrop_clips=args.backdrop_clips, batch=args.batch, replay_batch=args.replay_batch,
                          replay_weight=args.replay_weight)
    train(cfg, args.out, evaluate=not args.no_eval)


if __name__ == "__main__":
    main()
