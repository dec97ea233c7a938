"""Training the nano DiT: `sora.dit.WanDiT` at a small width, rectified flow on nano VAE latents of synthetic clips,
conditioned on MiniLM token states.

    python -m sora.nano.train_dit --vae runs/nano_vae/nano_vae.safetensors --run runs/nano_dit [--steps N]

1. Data, built once and cached in <run>/data.pt (building resumes too): `clips` generator clips (64x64, 33
   frames) encoded by the nano VAE and normalised with its latent statistics, and `captions_per_clip` captions
   each (the last one the direction phrase alone), encoded by MiniLM with rows past a caption's length zero (as
   the text encode node gives them).
2. Training. Noise levels σ are drawn uniformly and shifted toward noise (`shift`): the layout and the direction
   of motion are decided at high noise, which is where the small model needs the most practice. A share of the
   batches continue known frames, as extension and image-to-video ask of the model: a window of the clip whose
   first k latent frames are clean and get timestep 0 (the DiT takes a timestep per latent frame), the loss
   counting only the frames to generate; another share gives every frame its own noise level. Both make the
   direction of motion a thing the model can read off the frames it sees plus the caption, which a small model
   learns far sooner than producing a direction from the caption alone. Captions are dropped for `text_dropout`
   of the samples (replaced by the empty prompt's encoding) so that classifier-free guidance has an
   unconditional model to push against.
   Focus phases (`focus`) train on one kind of batch at high noise only, where the caption is the main clue to
   where the object goes. An exponential moving average of the weights is what gets evaluated and shipped.
3. Every `eval_every` steps the EMA model generates clips for fixed prompts with the real sampler
   (`sora.samplers.sample`, the nano defaults), the VAE decodes them and `judge` scores colour and direction;
   the accuracies are logged. <run>/last.pt holds the state for resuming.
4. At the end <run>/nano_dit.safetensors is written in the original Wan key layout with the `sora.*` metadata
   `sora.dit.load_dit` reads (family nano, heads, text length) and the latent format.
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

from ..checkpoints import read_metadata
from ..dit import DiTConfig, WanDiT, load_dit
from ..latent_formats import LatentFormat, register
from ..schedules import shift_sigmas
from ..text import TextEncoder, load_minilm
from ..vae import WanVAE, load_vae
from . import data, judge, latent_format_from_metadata, latent_format_metadata
from . import vocabulary as vocab
from .pipeline import NanoPipeline

SEED_BASE = 20_000_000  # training clip seeds; the VAE's lie at 10M, tests and benchmarks use small seeds
EVAL_SEED_BASE = 30_000_000


@dataclass(frozen=True)
class DiTTrainConfig:
    dim: int = 128
    num_heads: int = 4  # head size 32: RoPE splits it into 6 time, 5 row and 5 column frequency pairs
    num_layers: int = 4
    ffn_dim: int = 512
    text_len: int = 32  # MiniLM tokens kept; the longest caption is about 20
    clips: int = 2000
    captions_per_clip: int = 3
    frames: int = 33
    size: int = 64
    batch: int = 32
    steps: int = 10_000  # the shipped run: 80 minutes on 2 CPU cores
    lr: float = 5e-4
    warmup: int = 100
    ema: float = 0.998
    shift: float = 3.0
    text_dropout: float = 0.15
    # Image-to-video batches: only the first (one-pixel-frame) latent frame is known, so where the object is comes
    # from that frame and which way it goes from the caption alone. Measured: with few of them the model had
    # learned colour perfectly after 3200 steps while its direction of motion was set by the noise seed, whatever
    # the caption said; these batches make the direction words the only way to lower the loss.
    i2v_share: float = 0.25
    extend_share: float = 0.15  # batches with known leading frames anywhere in the clip (extension)
    # Text-to-video batches on a clip's first 5-8 latent frames (shorter videos). Extensions start from 17-frame
    # clips the model makes itself. Measured on 32 prompts at 17 frames: with 5-20% of these, those clips went the
    # asked way in 0.75 of runs and an extension carried the motion on in 0.66; fine-tuned 3,000 steps at 35%, 0.94
    # and 0.94 (33-frame clips as good as before). The shipped run, 35% from scratch: extensions 0.91.
    short_share: float = 0.35
    framewise_share: float = 0.1  # batches with a noise level per frame
    # First-frame batches: latent frame 0 alone (text-to-image). An earlier run used 10-25% of them to try text-to-
    # video in two stages (first frame, then image-to-video); sampling all frames at once did better on the same
    # weights (direction 0.91 against 0.84, extensions 0.58 against 0.33), so they are off by default.
    image_share: float = 0.0
    # Extra loss weight on the latent cells the object covers (by pixel share). The object is a few cells of
    # each frame, and where it goes is what the direction words decide: with equal weights the loss is mostly
    # background, and the model learned colour long before direction.
    object_gain: float = 8.0
    # Direction focus phases (start step, end step, "i2v" or "t2v", σ_min): every batch of the phase is of that kind
    # with the frames to make at σ in [σ_min, 1], where the caption is the main clue to where the object goes.
    # Measured from scratch: the swapped-direction loss gap (see caption_variants) of image-to-video rose from 0 to
    # a third of the loss in 700 steps of "i2v" focus. The batches of the other kinds keep the rest in shape.
    focus: tuple[tuple[int, int, str, float], ...] = ((0, 800, "i2v", 0.9),)
    eval_every: int = 500
    eval_prompts: int = 16
    log_every: int = 25
    checkpoint_every: int = 100

    def dit_config(self, channels: int) -> DiTConfig:
        return DiTConfig(model_type="t2v", in_dim=channels, out_dim=channels, dim=self.dim, ffn_dim=self.ffn_dim,
                         num_heads=self.num_heads, num_layers=self.num_layers, text_dim=384,
                         text_len=self.text_len, latent_format="nano", per_token_timesteps=True)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------

def encode_captions(encoder: TextEncoder, captions: list[str], text_len: int) -> torch.Tensor:
    """Captions -> [N, text_len, 384] token states, zero past each caption's length."""
    out = torch.zeros(len(captions), text_len, encoder.dim)
    for i in range(0, len(captions), 256):
        embeds, _ = encoder.encode(captions[i:i + 256])
        rows = min(text_len, embeds.shape[1])
        out[i:i + len(embeds), :rows] = embeds[:, :rows]
    return out


def caption_variants(clip: data.Clip, seed: int, count: int) -> list[str]:
    """The clip's own caption, `count - 2` more wordings of the same scene, and its direction phrase alone.

    The direction-only caption is what lets the model learn to read direction words. Measured on image-to-video
    batches (first frame known, the rest at σ >= 0.9): with full captions only, the loss with the direction word
    swapped stayed equal to the loss with the right one for 500 steps (the model ignored it, as it had for the
    first 4,800 steps of an earlier run); with a third of the captions reduced to the direction phrase, swapping
    it cost 0.09 (a third of the loss) by step 700, measured on full captions. In a full caption the direction
    word is one token among ten, and its state differs little from its opposite's (MiniLM cosine 0.78 for
    left/right).
    """
    full = [clip.caption] + [data.write_caption(clip.scene, random.Random(f"{seed}/{k}")) for k in range(1, count - 1)]
    return full + [random.Random(f"{seed}/direction").choice(vocab.DIRECTION_PHRASES[clip.scene.direction])]


def build_dataset(cfg: DiTTrainConfig, vae: WanVAE, fmt: LatentFormat, encoder: TextEncoder, path: Path) -> dict:
    """Encode the training clips and captions once; partial work is saved every few hundred clips and resumed."""
    partial = path.with_suffix(".partial.pt")
    latents: list[torch.Tensor] = []
    if partial.is_file():
        latents = list(torch.load(partial, weights_only=True)["latents"].split(1))
        print(f"resuming the dataset at clip {len(latents)}", flush=True)
    started = time.time()
    while len(latents) < cfg.clips:
        first = len(latents)
        seeds = range(SEED_BASE + first, SEED_BASE + min(first + 16, cfg.clips))
        videos = torch.stack([data.make_clip(s, cfg.frames, cfg.size, cfg.size).video for s in seeds])
        latents.extend(fmt.normalize(vae.encode(videos)).half().split(1))
        if len(latents) // 256 > first // 256 or len(latents) == cfg.clips:
            torch.save({"latents": torch.cat(latents)}, partial)
            print(f"encoded {len(latents)}/{cfg.clips} clips, {time.time() - started:.0f}s", flush=True)
    captions = []
    for i in range(cfg.clips):
        clip = data.make_clip(SEED_BASE + i, cfg.frames, cfg.size, cfg.size)
        captions.extend(caption_variants(clip, SEED_BASE + i, cfg.captions_per_clip))
    dataset = {"latents": torch.cat(latents), "context": encode_captions(encoder, captions, cfg.text_len).half(),
               "empty": encode_captions(encoder, [""], cfg.text_len),
               "object": object_coverage(cfg, vae.config.spatial_factor, vae.config.temporal_factor)}
    torch.save(dataset, path)
    partial.unlink()
    return dataset


def object_coverage(cfg: DiTTrainConfig, spatial: int, temporal: int) -> torch.Tensor:
    """[clips, T, h, w] float16: the share of the pixels behind each latent cell that show the object."""
    out = []
    for i in range(cfg.clips):
        on_object = data.object_pixels(data.make_clip(SEED_BASE + i, cfg.frames, cfg.size, cfg.size))
        first, rest = on_object[:1], on_object[1:].unflatten(0, (-1, temporal)).mean(dim=1)
        out.append(torch.nn.functional.avg_pool2d(torch.cat([first, rest]), spatial).half())
    return torch.stack(out)


def training_batch(dataset: dict, cfg: DiTTrainConfig, generator: torch.Generator,
                   focus: tuple[str, float] | None = None):
    """One batch: (x0 [B, C, T, H, W], sigma [B, T] noise level per latent frame, 0 = known, context [B, L, 384],
    cells [B, T, H, W] loss weight per latent cell, 1 + object_gain x object coverage).

    Every sample of a batch shares one window of latent frames and one kind of noise:
    - text-to-video: the whole clip, or its first 5-8 frames (shorter videos), one σ per sample;
    - first frame: latent frame 0 alone (text-to-image);
    - image-to-video: the clip's first 5 to all latent frames (shorter videos too) with the first one clean;
    - known frames: a window from frame 0-4 to the end whose first 1-3 frames are clean (extension);
    - frame-wise noise: the whole clip with a σ per frame, so that frames are predicted from less noisy ones.
    The last three teach the model where the object goes next given where it is, in the caption's direction.
    `focus` (kind, σ_min): every sample of that kind, σ drawn from [σ_min, 1] (see `DiTTrainConfig.focus`).
    """
    latents, contexts = dataset["latents"], dataset["context"]
    clips, _, frames = latents.shape[:3]
    B = cfg.batch
    pick = lambda low, high: int(torch.randint(low, high + 1, (), generator=generator))  # noqa: E731
    noise_level = lambda *shape: shift_sigmas(torch.rand(shape, generator=generator), cfg.shift)  # noqa: E731
    mode = float(torch.rand((), generator=generator))
    if focus is not None:  # i2v: the first branch below; t2v: none of them
        mode = 0.0 if focus[0] == "i2v" else 1.0
    start, length, known, framewise = 0, frames, 0, False
    if mode < cfg.i2v_share:
        known, length = 1, pick(5, frames)
    elif mode < cfg.i2v_share + cfg.extend_share:
        start = pick(0, frames - 5)
        length = frames - start
        known = pick(1, min(3, length - 2))
    elif mode < cfg.i2v_share + cfg.extend_share + cfg.short_share:
        length = pick(5, frames - 1)
    elif mode < cfg.i2v_share + cfg.extend_share + cfg.short_share + cfg.framewise_share:
        framewise = True
    elif mode < cfg.i2v_share + cfg.extend_share + cfg.short_share + cfg.framewise_share + cfg.image_share:
        length = 1
    if focus is not None:
        sigma = (focus[1] + (1 - focus[1]) * torch.rand(B, 1, generator=generator)).expand(B, length).clone()
        sigma[:, :known] = 0.0
    elif framewise:
        sigma = noise_level(B, length)
    else:
        sigma = noise_level(B, 1).expand(B, length).clone()
        sigma[:, :known] = 0.0
    index = torch.randint(0, clips, (B,), generator=generator)
    caption = index * cfg.captions_per_clip + torch.randint(0, cfg.captions_per_clip, (B,), generator=generator)
    x0 = latents[index, :, start:start + length].float()
    context = contexts[caption].float()
    drop = torch.rand(B, generator=generator) < cfg.text_dropout
    context[drop] = dataset["empty"][0]
    cells = 1.0 + cfg.object_gain * dataset["object"][index, start:start + length].float()
    return x0, sigma, context, cells


def flow_loss(model: WanDiT, x0: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
              generator: torch.Generator, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified-flow loss: x_σ = (1-σ)·x0 + σ·ε per latent frame, target v = ε - x0, on the frames with σ > 0,
    each latent cell weighted by `cells` [B, T, H, W] (default 1).

    Known frames (σ = 0) enter clean with timestep 0, as the sampler gives them (sora.conditioning.KnownFrames).
    """
    s = sigma[:, None, :, None, None]
    noise = torch.randn(x0.shape, generator=generator)
    v = model((1 - s) * x0 + s * noise, sigma * 1000.0, context)
    weight = (sigma > 0).float()[:, None, :, None, None].expand_as(v)
    if cells is not None:
        weight = weight * cells[:, None]
    return ((v - (noise - x0)).square() * weight).sum() / weight.sum()


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------

def eval_prompts(count: int) -> list[tuple[str, str, str]]:
    """(colour, direction, caption) for `count` fixed prompts cycling through every direction and colour."""
    colors, directions = sorted(vocab.COLORS), sorted(vocab.DIRECTIONS)
    out = []
    for i in range(count):
        color, direction = colors[(i + i // len(colors)) % len(colors)], directions[i % len(directions)]
        clip = data.make_clip(EVAL_SEED_BASE + i, color=color, direction=direction)
        out.append((color, direction, clip.caption))
    return out


def evaluate(model: WanDiT, vae: WanVAE, encoder: TextEncoder, cfg: DiTTrainConfig) -> dict[str, float]:
    """Colour and direction accuracy of the judge on text-to-video clips of the fixed evaluation prompts, made
    with the real sampler at the nano defaults."""
    pipeline = NanoPipeline(dit=model, vae=vae, encoder=encoder)
    prompts = eval_prompts(cfg.eval_prompts)
    videos = torch.cat([pipeline.decode(pipeline.text_to_latent([p[2] for p in prompts[i:i + 8]], seed=i))
                        for i in range(0, len(prompts), 8)])
    verdicts = [judge.judge_video(v) for v in videos]
    color = sum(v.color == p[0] for v, p in zip(verdicts, prompts)) / len(prompts)
    motion = sum(v.direction == p[1] for v, p in zip(verdicts, prompts)) / len(prompts)
    return {"color_acc": color, "motion_acc": motion}


# ------------------------------------------------------------------------------------------------------------------
# Training loop and export
# ------------------------------------------------------------------------------------------------------------------

def learning_rate(cfg: DiTTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def export(model: WanDiT, cfg: DiTTrainConfig, fmt: LatentFormat, path: Path, extra: dict[str, str]) -> None:
    """Write the weights (float32, original Wan keys) with the metadata `load_dit` reads."""
    metadata = {"sora.family": "nano", "sora.kind": "dit", "sora.num_heads": str(cfg.num_heads),
                "sora.text_len": str(cfg.text_len), **latent_format_metadata(fmt), **extra}
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # readers never see a half-written file


def train(cfg: DiTTrainConfig, vae_file: Path, run: Path, eval_vae_file: Path | None = None,
          init: Path | None = None) -> Path:
    """Build or load the dataset, train (resuming from <run>/last.pt), export <run>/nano_dit.safetensors.

    vae_file: the VAE whose encoder makes the latents (and whose latent statistics normalise them);
    eval_vae_file: a VAE with the same encoder whose decoder is still training, reread for every evaluation;
    init: a nano DiT file to start from (fine-tuning) when the run has no checkpoint yet.
    """
    run.mkdir(parents=True, exist_ok=True)
    fmt = register(latent_format_from_metadata(read_metadata(vae_file)))
    vae = load_vae(vae_file, dtype=torch.float32)
    encoder = load_minilm()
    data_file = run / "data.pt"
    if data_file.is_file():
        dataset = torch.load(data_file, weights_only=True)
        if "object" not in dataset:  # a dataset from before the object weights
            dataset["object"] = object_coverage(cfg, vae.config.spatial_factor, vae.config.temporal_factor)
            torch.save(dataset, data_file)
    else:
        dataset = build_dataset(cfg, vae, fmt, encoder, data_file)

    torch.manual_seed(0)
    model = WanDiT(cfg.dit_config(fmt.channels))
    ema = WanDiT(cfg.dit_config(fmt.channels)).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, history = 0, []
    last = run / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], json.loads(state["history"])
        print(f"resumed from {last} at step {step}", flush=True)
    elif init is not None:
        start = load_dit(init, compute_dtype=torch.float32).state_dict()
        model.load_state_dict(start)
        ema.load_state_dict(start)
        print(f"starting from {init}", flush=True)
    print(f"nano DiT: {sum(p.numel() for p in model.parameters()):,} parameters, {len(dataset['latents'])} clips, "
          f"config {cfg}", flush=True)

    generator = torch.Generator().manual_seed(step)
    started, total = time.time(), 0.0
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        focus = next(((kind, low) for start, end, kind, low in cfg.focus if start <= step < end), None)
        x0, sigma, context, cells = training_batch(dataset, cfg, generator, focus)
        loss = flow_loss(model, x0, sigma, context, generator, cells)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - cfg.ema)
        step += 1
        total += loss.item()
        if step % cfg.log_every == 0:
            history.append({"step": step, "loss": total / cfg.log_every})
            print(f"step {step} loss {total / cfg.log_every:.4f} lr {learning_rate(cfg, step):.2e} "
                  f"{time.time() - started:.0f}s", flush=True)
            total = 0.0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if eval_vae_file is not None and eval_vae_file.is_file():  # a decoder that trains alongside
                vae = load_vae(eval_vae_file, dtype=torch.float32)
            scores = evaluate(ema, vae, encoder, cfg)
            history.append({"step": step, **scores})
            print(f"eval step {step} color_acc {scores['color_acc']:.2f} motion_acc {scores['motion_acc']:.2f}",
                  flush=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            tmp = last.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "history": json.dumps(history), "config": dataclasses.asdict(cfg)}, tmp)
            tmp.replace(last)

    out = run / "nano_dit.safetensors"
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "color_acc" in h]
    export(ema, cfg, fmt, out, {"sora.train_steps": str(step), "sora.train_config": json.dumps(dataclasses.asdict(cfg)),
                                "sora.final_loss": f"{sum(losses[-8:]) / max(len(losses[-8:]), 1):.4f}",
                                "sora.eval": json.dumps(evals[-1] if evals else {})})
    print(f"wrote {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", type=Path, default=Path("runs/nano_vae/nano_vae.safetensors"))
    parser.add_argument("--eval-vae", type=Path, default=None,
                        help="decode evaluation clips with this VAE (same encoder, decoder still training)")
    parser.add_argument("--run", type=Path, default=Path("runs/nano_dit"), help="checkpoint and output folder")
    parser.add_argument("--steps", type=int, default=DiTTrainConfig.steps)
    parser.add_argument("--lr", type=float, default=DiTTrainConfig.lr, help="peak learning rate")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this nano DiT file (fine-tuning) instead of random weights")
    parser.add_argument("--focus", nargs=4, action="append", metavar=("START", "END", "KIND", "SIGMA_MIN"),
                        help="a direction focus phase: steps START-END all KIND (i2v or t2v) batches at sigma >= "
                             f"SIGMA_MIN; repeat for more phases (default: {DiTTrainConfig.focus})")
    parser.add_argument("--no-focus", action="store_true", help="no focus phase (for fine-tuning)")
    parser.add_argument("--i2v-share", type=float, default=DiTTrainConfig.i2v_share,
                        help="share of image-to-video batches")
    parser.add_argument("--extend-share", type=float, default=DiTTrainConfig.extend_share,
                        help="share of batches with known leading frames (extension)")
    parser.add_argument("--image-share", type=float, default=DiTTrainConfig.image_share,
                        help="share of first-frame (text-to-image) batches")
    parser.add_argument("--short-share", type=float, default=DiTTrainConfig.short_share,
                        help="share of text-to-video batches on a clip's first 5-8 latent frames")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (more than the free cores slows it down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    focus = DiTTrainConfig.focus if args.focus is None else tuple(
        (int(a), int(b), kind, float(low)) for a, b, kind, low in args.focus)
    if args.no_focus:
        focus = ()
    if any(kind not in ("i2v", "t2v") for _, _, kind, _ in focus):
        parser.error("--focus KIND must be i2v or t2v")
    cfg = DiTTrainConfig(steps=args.steps, lr=args.lr, focus=focus, i2v_share=args.i2v_share,
                         extend_share=args.extend_share, image_share=args.image_share, short_share=args.short_share)
    train(cfg, args.vae, args.run, args.eval_vae, args.init)


if __name__ == "__main__":
    main()
