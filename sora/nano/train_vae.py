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
from torch import nn

from ..checkpoints import read_metadata
from ..latent_formats import LatentFormat
from ..vae import (
    AttentionBlock,
    CausalConv3d,
    DownStage,
    Resample,
    ResidualBlock,
    UpStage,
    VAEConfig,
    WanVAE,
    average_down,
    duplicate_up,
    patchify,
    unpatchify,
)
from . import data, judge, latent_format_from_metadata, latent_format_metadata

SEED_BASE = 10_000_000  # training clip seeds start here, far from the small seeds of tests and evaluations
LOGVAR_INIT = -8.0  # initial log-variance of the posterior (standard deviation 0.02)


@dataclass(frozen=True)
class VAETrainConfig:
    base_dim: int = 8  # encoder width at full resolution: flat colours need few channels
    decoder_base_dim: int = 16
    z_dim: int = 8
    num_res_blocks: int = 1
    # Wan 2.2's parameter-free shortcuts around each stage (average down, duplicate up) carry the colours straight
    # through; without them the small 2.1 layout learned shapes and positions but reconstructed objects in grey.
    residual_shortcuts: bool = True
    # Whole 64x64 frames while the model learns colours and shapes on short clips (the first one-frame causal chunk
    # and one cached chunk), then 33-frame clips cut to crops around the object: a causal VAE trained on short clips
    # drifts further from the input with every frame past what it saw (measured: error x10 by frame 32).
    short_frames: int = 5
    short_steps: int = 500
    short_crop: int = 64
    frames: int = 33
    size: int = 64
    crop: int = 32  # clips are cut to crops of this size around the object
    batch: int = 4
    steps: int = 1200  # encoder and decoder together ...
    lr: float = 1e-3
    # ... then the decoder alone on whole 33-frame clips, the encoder frozen: the latent space (and the DiT trained
    # on it) stays as it is while the decoder learns the long-range steady state of its causal caches. Without
    # it, some clips grew background blotches from frame 10 on, which the judge read as the object moving.
    decoder_steps: int = 100
    decoder_frames: int = 33
    decoder_batch: int = 1
    decoder_lr: float = 3e-4
    warmup: int = 50
    kl_weight: float = 1e-4
    # Pulls latent channels 0-2 toward the mean colour of their cell. Without it the small encoder's output starts
    # out dominated by its biases and takes hundreds of steps to begin carrying the input; it also makes the
    # latent partly readable as a small image.
    rgb_weight: float = 1.0
    # Colour is learned long after brightness: a decoder that draws every object in grey already scores well on
    # L1 + MSE. This term counts only the error that remains after removing its grey (channel-mean) part.
    chroma_weight: float = 2.0
    # Share of each clip's loss that its object pixels carry, however few they are (a few percent of a frame):
    # with plain per-pixel weights the decoder can ignore the object and still score well.
    object_share: float = 0.5
    stats_clips: int = 64  # 33-frame clips encoded to measure the latent statistics
    eval_clips: int = 16
    log_every: int = 25
    checkpoint_every: int = 100

    def vae_config(self) -> VAEConfig:
        return VAEConfig(base_dim=self.base_dim, decoder_base_dim=self.decoder_base_dim, z_dim=self.z_dim,
                         num_res_blocks=self.num_res_blocks, residual_shortcuts=self.residual_shortcuts)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------

def training_batch(cfg: VAETrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips of `step` (crops around the object while the encoder trains, whole frames after), shaped
    [B, 3, F, crop, crop], and per-pixel loss weights [B, 1, F, crop, crop]."""
    if step < cfg.short_steps:
        frames, crop, batch = cfg.short_frames, cfg.short_crop, cfg.batch
    elif step < cfg.steps:
        frames, crop, batch = cfg.frames, cfg.crop, cfg.batch
    else:
        frames, crop, batch = cfg.decoder_frames, cfg.size, cfg.decoder_batch
    videos, weights = [], []
    for i in range(batch):
        seed = SEED_BASE + step * cfg.batch + i
        clip = data.make_clip(seed, frames=frames, height=cfg.size, width=cfg.size)
        rng = random.Random(seed)
        cx, cy = clip.scene.centre((frames - 1) / 2)
        jitter = crop / 4
        x0 = min(max(round(cx - crop / 2 + rng.uniform(-jitter, jitter)), 0), cfg.size - crop)
        y0 = min(max(round(cy - crop / 2 + rng.uniform(-jitter, jitter)), 0), cfg.size - crop)
        video = clip.video[:, :, y0:y0 + crop, x0:x0 + crop]
        on_object = data.object_pixels(clip)[None, :, y0:y0 + crop, x0:x0 + crop]
        videos.append(video)
        share = on_object.mean().clamp(1e-3, 1 - 1e-3)
        off_object = (1 - on_object) * ((1 - cfg.object_share) / (1 - share))
        weights.append(on_object * (cfg.object_share / share) + off_object)
    return torch.stack(videos), torch.stack(weights)


# ------------------------------------------------------------------------------------------------------------------
# Differentiable passes. WanVAE.encode / decode are inference-only (no autograd, buffers written in place), so
# training runs the same Wan 2.1 architecture functionally on the module's own parameters, chunk by chunk as
# encode and decode do; a test checks that the two agree.
# ------------------------------------------------------------------------------------------------------------------

class _Chunks:
    """What a pass carries from one causal chunk to the next: each causal conv's last input frames, the last
    frame before each temporal downsampling, and which temporal resamplings have seen their first chunk."""

    def __init__(self):
        self.tails: dict[nn.Module, torch.Tensor] = {}
        self.seen: set[nn.Module] = set()

    def first_visit(self, module: nn.Module) -> bool:
        first = module not in self.seen
        self.seen.add(module)
        return first


def _causal_conv(conv: CausalConv3d, x: torch.Tensor, chunks: _Chunks) -> torch.Tensor:
    if conv.time_pad:
        past = chunks.tails.get(conv)
        if past is None:
            past = x.new_zeros(*x.shape[:2], conv.time_pad, *x.shape[3:])
        x = torch.cat([past, x], dim=2)
        chunks.tails[conv] = x[:, :, -conv.time_pad:]
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) * (norm.gamma * norm.gamma.shape[0] ** 0.5)


def _norm_silu_conv(norm: nn.Module, conv: CausalConv3d, x: torch.Tensor, chunks: _Chunks) -> torch.Tensor:
    return _causal_conv(conv, F.silu(_rms_norm(norm, x)), chunks)


def _residual(block: ResidualBlock, x: torch.Tensor, chunks: _Chunks) -> torch.Tensor:
    norm1, _, conv1, norm2, _, _, conv2 = block.residual
    shortcut = x if isinstance(block.shortcut, nn.Identity) else _causal_conv(block.shortcut, x, chunks)
    return _norm_silu_conv(norm2, conv2, _norm_silu_conv(norm1, conv1, x, chunks), chunks) + shortcut


def _attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Single-head attention over the positions of each frame."""
    B, C, T, H, W = x.shape
    frames = x.transpose(1, 2).reshape(B * T, C, H, W)
    qkv = block.to_qkv(_rms_norm(block.norm, frames)).flatten(2).transpose(1, 2)  # [B*T, H*W, 3C]
    q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B * T, C, H, W)
    return block.proj(out).view(B, T, C, H, W).transpose(1, 2) + x


def _resample(block: Resample, x: torch.Tensor, chunks: _Chunks) -> torch.Tensor:
    spatial = block.resample[1]
    if block.mode == "upsample3d" and not chunks.first_visit(block):  # the first chunk stays one frame
        B, C, T, H, W = x.shape
        x = _causal_conv(block.time_conv, x, chunks).view(B, 2, C, T, H, W)
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)  # frame 2t+g from channel half g of frame t
    if block.mode.startswith("upsample"):
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest-exact")
        return F.conv3d(x, spatial.weight.unsqueeze(2), spatial.bias, padding=(0, 1, 1))
    x = F.conv3d(F.pad(x, (0, 1, 0, 1)), spatial.weight.unsqueeze(2), spatial.bias, stride=(1, 2, 2))
    if block.mode == "downsample3d":
        last = x[:, :, -1:]
        if not chunks.first_visit(block):  # later chunks are halved in time with the previous chunk's last frame
            conv = block.time_conv
            x = F.conv3d(torch.cat([chunks.tails[block], x], dim=2), conv.weight, conv.bias, conv.stride)
        chunks.tails[block] = last
    return x


def _layers(layers, x: torch.Tensor, chunks: _Chunks) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, ResidualBlock):
            x = _residual(layer, x, chunks)
        elif isinstance(layer, AttentionBlock):
            x = _attention(layer, x)
        elif isinstance(layer, Resample):
            x = _resample(layer, x, chunks)
        elif isinstance(layer, DownStage):  # 2.2 layout: a stage plus its parameter-free averaging shortcut
            x = _layers(layer.downsamples, x, chunks) + average_down(x, layer.out_dim, layer.factor_t,
                                                                      layer.factor_s)
        elif isinstance(layer, UpStage):  # ... and its duplicating shortcut
            first = chunks.first_visit(layer)
            y = _layers(layer.upsamples, x, chunks)
            x = y if layer.factor_s == 1 else y + duplicate_up(x, layer.out_dim, layer.factor_t, layer.factor_s,
                                                                first)
        else:
            raise TypeError(f"the nano VAE trainer does not know the layer {type(layer).__name__}")
    return x


def encode_posterior(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [B, 3, F, H, W] -> (mu, logvar), each [B, z, T, H/8, W/8], in the causal chunks encode uses."""
    enc, frames, step = vae.encoder, video.shape[2], vae.config.temporal_factor
    video = patchify(video, vae.config.patch_size)
    chunks, moments = _Chunks(), []
    for a, b in [(0, 1)] + [(f, f + step) for f in range(1, frames, step)]:
        x = _layers([*enc.downsamples, *enc.middle], _causal_conv(enc.conv1, video[:, :, a:b], chunks), chunks)
        x = _norm_silu_conv(enc.head[0], enc.head[2], x, chunks)
        moments.append(_causal_conv(vae.conv1, x, chunks))
    return torch.cat(moments, dim=2).chunk(2, dim=1)


def decode_frames(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """Latent [B, z, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w], one latent frame at a time, unclamped."""
    dec, chunks, frames = vae.decoder, _Chunks(), []
    for t in range(z.shape[2]):
        x = _causal_conv(dec.conv1, _causal_conv(vae.conv2, z[:, :, t:t + 1], chunks), chunks)
        x = _layers([*dec.middle, *dec.upsamples], x, chunks)
        frames.append(_norm_silu_conv(dec.head[0], dec.head[2], x, chunks))
    return unpatchify(torch.cat(frames, dim=2), vae.config.patch_size)


def loss_terms(vae: WanVAE, video: torch.Tensor, weight: torch.Tensor, cfg: VAETrainConfig,
               generator: torch.Generator, train_encoder: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts (rec: weighted L1 + MSE, chroma: weighted L1 of the error
    with its grey part removed, kl, rgb: latent colour guide, weighted like the pixels behind each cell); with a
    frozen encoder only the reconstruction counts."""
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        mu, logvar = encode_posterior(vae, video)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
    error = decode_frames(vae, z) - video
    rec = (weight * (error.abs() + error.square())).mean()
    chroma = (weight * (error - error.mean(dim=1, keepdim=True)).abs()).mean()
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()
    s, t = vae.config.spatial_factor, vae.config.temporal_factor
    rgb = (pooled_rgb(weight, s, t) * (mu[:, :3] - pooled_rgb(video, s, t)).square()).mean()
    loss = rec + cfg.chroma_weight * chroma
    if train_encoder:
        loss = loss + cfg.kl_weight * kl + cfg.rgb_weight * rgb
    return loss, {"rec": rec.item(), "chroma": chroma.item(), "kl": kl.item(), "rgb": rgb.item()}


# ------------------------------------------------------------------------------------------------------------------
# Statistics, evaluation, export
# ------------------------------------------------------------------------------------------------------------------

def pooled_rgb(video: torch.Tensor, spatial: int, temporal: int) -> torch.Tensor:
    """Video [B, C, F, H, W] -> the mean colour of the pixels behind each latent cell, [B, C, T, H/s, W/s]."""
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
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # readers never see a half-written file


# ------------------------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------------------------

def learning_rate(cfg: VAETrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth; the decoder phase decays again from `decoder_lr`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if step < cfg.steps:
        peak, progress = cfg.lr, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    else:
        peak, progress = cfg.decoder_lr, (step - cfg.steps) / max(cfg.decoder_steps, 1)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _optimizer(vae: WanVAE, cfg: VAETrainConfig, step: int) -> torch.optim.Optimizer:
    """Adam over the whole VAE, or, in the decoder phase, over what runs after the latent (encoder frozen)."""
    if step < cfg.steps:
        return torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    vae.encoder.requires_grad_(False)
    vae.conv1.requires_grad_(False)
    return torch.optim.Adam([*vae.conv2.parameters(), *vae.decoder.parameters()], lr=cfg.decoder_lr)


def _save_checkpoint(path: Path, vae: WanVAE, optimizer: torch.optim.Optimizer, step: int,
                     cfg: VAETrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": dataclasses.asdict(cfg)}, tmp)
    tmp.replace(path)  # a crash while saving never leaves a broken checkpoint behind


def _export_measured(vae: WanVAE, cfg: VAETrainConfig, path: Path, step: int, logged: dict) -> Path:
    vae.eval()
    fmt = measure_latent_format(vae, cfg.stats_clips, SEED_BASE - 100_000)
    scores = evaluate(vae, cfg.eval_clips, SEED_BASE - 200_000)
    vae.train()
    print(f"latent mean {[round(m, 3) for m in fmt.mean]} std {[round(s, 3) for s in fmt.std]}", flush=True)
    print(f"eval psnr {scores['psnr']:.2f} dB judge_agreement {scores['judge_agreement']:.2f}", flush=True)
    export(vae, fmt, path, {"sora.train_steps": str(step), "sora.train_config": json.dumps(dataclasses.asdict(cfg)),
                            "sora.final_loss": json.dumps(logged), "sora.eval": json.dumps(scores)})
    print(f"wrote {path}", flush=True)
    return path


def train(cfg: VAETrainConfig, run: Path) -> Path:
    """Train (resuming from <run>/last.pt); write <run>/nano_vae_joint.safetensors when the encoder is final
    (its latents can feed the DiT from then on), <run>/nano_vae_latest.safetensors at every checkpoint of the
    decoder phase, and <run>/nano_vae.safetensors at the end; returns the latter."""
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = WanVAE(cfg.vae_config())
    with torch.no_grad():
        # Start with a narrow posterior: at the default init the sampled latent would be mostly unit noise, and
        # the decoder could learn nothing until the KL-weak gradient had shrunk it.
        vae.conv1.bias[cfg.z_dim:] = LOGVAR_INIT
    step, state = 0, None
    last = run / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=True)
        vae.load_state_dict(state["model"])
        step = state["step"]
        print(f"resumed from {last} at step {step}", flush=True)
    optimizer = _optimizer(vae, cfg, step)
    if state is not None and step != cfg.steps:  # at the phase change the optimizer starts afresh
        optimizer.load_state_dict(state["optimizer"])
    print(f"nano VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, config {cfg}", flush=True)

    generator = torch.Generator().manual_seed(step)
    started, totals, logged = time.time(), dict.fromkeys(("rec", "chroma", "kl", "rgb"), 0.0), {}
    joint = run / "nano_vae_joint.safetensors"
    while step < cfg.steps + cfg.decoder_steps:
        if step == cfg.steps:
            if not joint.is_file():
                _export_measured(vae, cfg, joint, step, logged)
            optimizer = _optimizer(vae, cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        video, weight = training_batch(cfg, step)
        loss, terms = loss_terms(vae, video, weight, cfg, generator, train_encoder=step < cfg.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        step += 1
        for k in totals:
            totals[k] += terms[k] / cfg.log_every
        if step % cfg.log_every == 0:
            print(f"step {step} rec {totals['rec']:.4f} chroma {totals['chroma']:.4f} kl {totals['kl']:.3f} "
                  f"rgb {totals['rgb']:.4f} "
                  f"lr {learning_rate(cfg, step):.2e} {time.time() - started:.0f}s", flush=True)
            logged, totals = totals, dict.fromkeys(totals, 0.0)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps + cfg.decoder_steps:
            _save_checkpoint(last, vae, optimizer, step, cfg)
            vae.eval()
            scores = evaluate(vae, 8, SEED_BASE - 200_000)
            vae.train()
            print(f"step {step} held-out psnr {scores['psnr']:.2f} dB judge_agreement {scores['judge_agreement']:.2f}",
                  flush=True)
            if step > cfg.steps:  # the decoder so far, for whoever decodes DiT samples meanwhile
                fmt = latent_format_from_metadata(read_metadata(joint))
                export(vae, fmt, run / "nano_vae_latest.safetensors", {"sora.train_steps": str(step)})
    return _export_measured(vae, cfg, run / "nano_vae.safetensors", step, logged)


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
