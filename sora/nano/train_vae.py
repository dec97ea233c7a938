"""Training the nano VAE: the Wan 2.1 VAE architecture at small widths, on synthetic clips.

    python -m sora.nano.train_vae --run runs/nano_vae [--steps N] [--threads 1]

It only has to reproduce flat shapes on plain backgrounds, so it is small and trains on 9-frame crops: the first
(one-frame) causal chunk, the first cached chunk and a steady-state chunk, which is every case a longer clip has.
The loss is L1 + MSE (weighted up on object pixels, which are few) plus a small KL term, and the latent is
sampled from the posterior while training so that the decoder tolerates the imperfect latents a DiT makes.

Every `checkpoint_every` steps the state goes to <run>/last.pt, and a rerun resumes from it. At the end the
weights are written to <run>/nano_vae.safetensors in the original Wan key layout (what `sora.vae.load_vae`
reads), with `sora.*` metadata that includes the latent statistics measured on fresh clips.
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
import torch.nn.functional as F
from safetensors.torch import save_file

from ..latent_formats import LatentFormat
from ..vae import CausalCache, VAEConfig, WanVAE
from . import data, judge, latent_format_metadata
from . import vocabulary as vocab

SEED_BASE = 10_000_000  # training clip seeds start here, far from the small seeds of tests and evaluations


@dataclass(frozen=True)
class VAETrainConfig:
    base_dim: int = 8  # encoder width at full resolution: flat colours need few channels
    decoder_base_dim: int = 16
    z_dim: int = 8
    num_res_blocks: int = 1
    frames: int = 9
    size: int = 64  # clips are rendered at this size ...
    crop: int = 32  # ... and cut to crops of this size around the object
    batch: int = 4
    steps: int = 800
    lr: float = 1e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    object_weight: float = 4.0  # extra loss weight on object pixels
    stats_clips: int = 64  # 33-frame clips encoded to measure the latent statistics
    eval_clips: int = 16
    log_every: int = 25
    checkpoint_every: int = 100

    def vae_config(self) -> VAEConfig:
        return VAEConfig(base_dim=self.base_dim, decoder_base_dim=self.decoder_base_dim, z_dim=self.z_dim,
                         num_res_blocks=self.num_res_blocks)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------

def training_batch(cfg: VAETrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops [B, 3, F, crop, crop] of the clips of `step`, and per-pixel loss weights [B, 1, F, crop, crop]."""
    videos, weights = [], []
    for i in range(cfg.batch):
        seed = SEED_BASE + step * cfg.batch + i
        clip = data.make_clip(seed, frames=cfg.frames, height=cfg.size, width=cfg.size)
        rng = random.Random(seed)
        cx, cy = clip.scene.centre((cfg.frames - 1) / 2)
        jitter = cfg.crop / 4
        x0 = min(max(round(cx - cfg.crop / 2 + rng.uniform(-jitter, jitter)), 0), cfg.size - cfg.crop)
        y0 = min(max(round(cy - cfg.crop / 2 + rng.uniform(-jitter, jitter)), 0), cfg.size - cfg.crop)
        video = clip.video[:, :, y0:y0 + cfg.crop, x0:x0 + cfg.crop]
        background = torch.tensor(vocab.BACKGROUNDS[clip.scene.background]).view(3, 1, 1, 1) * 2 - 1
        on_object = ((video - background).abs().amax(dim=0, keepdim=True) > 1e-3).float()
        videos.append(video)
        weights.append(1.0 + cfg.object_weight * on_object)
    return torch.stack(videos), torch.stack(weights)


# ------------------------------------------------------------------------------------------------------------------
# Differentiable passes (WanVAE.encode / decode are inference-only: no_grad, mu only)
# ------------------------------------------------------------------------------------------------------------------

def encode_posterior(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [B, 3, F, H, W] -> (mu, logvar), each [B, z, T, H/8, W/8], in the causal chunks encode uses."""
    frames = video.shape[2]
    step = vae.config.temporal_factor
    bounds = [(0, 1)] + [(f, f + step) for f in range(1, frames, step)]
    cache = CausalCache()
    moments = torch.cat([vae.conv1(vae.encoder(video[:, :, a:b], cache)) for a, b in bounds], dim=2)
    return moments.chunk(2, dim=1)


def decode_frames(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """Latent [B, z, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w], one latent frame at a time, unclamped."""
    cache = CausalCache()
    return torch.cat([vae.decoder(vae.conv2(z[:, :, t:t + 1]), cache) for t in range(z.shape[2])], dim=2)


def loss_terms(vae: WanVAE, video: torch.Tensor, weight: torch.Tensor, kl_weight: float,
               generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    mu, logvar = encode_posterior(vae, video)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
    recon = decode_frames(vae, z)
    error = recon - video
    rec = (weight * (error.abs() + error.square())).mean()
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}


# ------------------------------------------------------------------------------------------------------------------
# Statistics, evaluation, export
# ------------------------------------------------------------------------------------------------------------------

def pooled_rgb(video: torch.Tensor, spatial: int, temporal: int) -> torch.Tensor:
    """Video [B, 3, F, H, W] -> the mean colour of the pixels behind each latent cell, [B, 3, T, H/s, W/s]."""
    first, rest = video[:, :, :1], video[:, :, 1:]
    B, C, F_, H, W = rest.shape
    groups = rest.reshape(B, C, F_ // temporal, temporal, H, W).mean(dim=3)
    return F.avg_pool3d(torch.cat([first, groups], dim=2), (1, spatial, spatial))


@torch.no_grad()
def measure_latent_format(vae: WanVAE, clips: int, seed_base: int) -> LatentFormat:
    """Per-channel mean/std of raw latents of `clips` fresh 33-frame clips, and a least-squares linear map from
    normalised latents to the colour behind each cell (the preview colours)."""
    videos = torch.stack([data.make_clip(seed_base + i).video for i in range(clips)])
    raw = torch.cat([vae.encode(videos[i:i + 8]) for i in range(0, clips, 8)])  # [N, z, T, h, w]
    z = raw.shape[1]
    cells = raw.transpose(0, 1).reshape(z, -1)  # [z, N·T·h·w]
    mean, std = cells.mean(dim=1), cells.std(dim=1)
    normalised = ((cells - mean[:, None]) / std[:, None]).T  # [cells, z]
    rgb = pooled_rgb(videos, vae.config.spatial_factor, vae.config.temporal_factor)
    rgb = rgb.transpose(0, 1).reshape(3, -1).T  # [cells, 3]
    design = torch.cat([normalised, torch.ones(len(normalised), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, rgb.double()).solution.float()  # [z + 1, 3]
    return LatentFormat(name="nano", channels=z, spatial=vae.config.spatial_factor,
                        temporal=vae.config.temporal_factor, mean=tuple(mean.tolist()), std=tuple(std.tolist()),
                        rgb_factors=tuple(tuple(row) for row in solution[:z].tolist()),
                        rgb_bias=tuple(solution[z].tolist()))


@torch.no_grad()
def evaluate(vae: WanVAE, clips: int, seed_base: int) -> dict[str, float]:
    """Reconstruction PSNR of full 64x64, 33-frame clips, and how often the judge reads the same colour and
    direction from the reconstruction as from the original."""
    psnr, agree = [], 0
    for i in range(clips):
        video = data.make_clip(seed_base + i).video
        recon = vae.decode(vae.encode(video[None]))[0]
        psnr.append(10 * math.log10(4.0 / (recon - video).square().mean().item()))
        a, b = judge.judge_video(video), judge.judge_video(recon)
        agree += (a.color, a.direction) == (b.color, b.direction)
    return {"psnr": sum(psnr) / clips, "judge_agreement": agree / clips}


def export(vae: WanVAE, fmt: LatentFormat, path: Path, extra: dict[str, str]) -> None:
    """Write the weights (float32, original Wan keys) with the metadata the loaders and `sora.nano` read."""
    metadata = {"sora.family": "nano", "sora.kind": "vae", **latent_format_metadata(fmt), **extra}
    tensors = {k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


# ------------------------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------------------------

def learning_rate(cfg: VAETrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, vae: WanVAE, optimizer: torch.optim.Optimizer, step: int,
                     cfg: VAETrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": dataclasses.asdict(cfg)}, tmp)
    tmp.replace(path)  # a crash while saving never leaves a broken checkpoint behind


def train(cfg: VAETrainConfig, run: Path) -> Path:
    """Train (resuming from <run>/last.pt), then export <run>/nano_vae.safetensors; returns its path."""
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = WanVAE(cfg.vae_config())
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    step = 0
    last = run / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed from {last} at step {step}", flush=True)
    print(f"nano VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, config {cfg}", flush=True)

    generator = torch.Generator().manual_seed(step)
    started, totals, logged = time.time(), {"rec": 0.0, "kl": 0.0}, {}
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        video, weight = training_batch(cfg, step)
        loss, terms = loss_terms(vae, video, weight, cfg.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        for k in totals:
            totals[k] += terms[k] / cfg.log_every
        if step % cfg.log_every == 0:
            print(f"step {step} rec {totals['rec']:.4f} kl {totals['kl']:.3f} lr {learning_rate(cfg, step):.2e} "
                  f"{time.time() - started:.0f}s", flush=True)
            logged, totals = totals, {"rec": 0.0, "kl": 0.0}
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(last, vae, optimizer, step, cfg)

    vae.eval()
    fmt = measure_latent_format(vae, cfg.stats_clips, SEED_BASE - 100_000)
    scores = evaluate(vae, cfg.eval_clips, SEED_BASE - 200_000)
    print(f"latent mean {[round(m, 3) for m in fmt.mean]} std {[round(s, 3) for s in fmt.std]}", flush=True)
    print(f"eval psnr {scores['psnr']:.2f} dB judge_agreement {scores['judge_agreement']:.2f}", flush=True)
    out = run / "nano_vae.safetensors"
    export(vae, fmt, out, {"sora.train_steps": str(step), "sora.train_config": json.dumps(dataclasses.asdict(cfg)),
                           "sora.final_loss": json.dumps(logged), "sora.eval": json.dumps(scores)})
    print(f"wrote {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/nano_vae"), help="checkpoint and output folder")
    parser.add_argument("--steps", type=int, default=VAETrainConfig.steps)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (more than the free cores slows it down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(VAETrainConfig(steps=args.steps), args.run)


if __name__ == "__main__":
    main()
