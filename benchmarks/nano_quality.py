"""Does the embedded nano model follow its prompt, and does an extension carry the motion on?

    python benchmarks/nano_quality.py [--threads 1] [--out DIR] [--dit FILE] [--only paraphrase|calibrate]
    python benchmarks/nano_quality.py --lora sora/nano/weights/nano_black_lora.safetensors

Text-to-video: every colour with every direction (32 prompt/seed pairs, captions worded by the data generator with
the shapes, sizes, speeds and backgrounds it draws), at the nano defaults (64x64, 33 frames, 20 UniPC steps,
guidance 5, empty negative prompt) through the real sampler; the judge reads each clip's colour and direction.
Extension: the same 32 prompts at 17 frames, each clip continued by 4 latent frames (16 pixel frames) conditioned on
its last 2 latent frames, joined into 33 frames; a run counts when the judge sees the same direction on both sides
of the join and no jump across it. Image-to-video: 8 first frames with the object in the middle, each asked to move
in all four directions with one seed (so only the words differ). `--out` also writes every clip as an mp4.

Paraphrases through the main job: each held-out prompt of tests/data/nano_paraphrases.json (users' own words:
part "unseen", words outside the mapper's tables, and part "everyday", words the tables know) is recaptioned by
`sora.nano.recaption.recaption_nano` with the run's seed, generated at the nano defaults and judged; the same
prompts encoded as typed (cut to the DiT's 32 text tokens) are the comparison. `--only paraphrase` runs this alone
(a few minutes on 2 cores); `--only calibrate` prints the similarity threshold sweep on the development set
tests/data/nano_dev_paraphrases.json (text level, no generation), where `recaption.THRESHOLDS` come from.

`--lora FILE` scores a nano LoRA instead: the text-to-video prompts above with the base model and with the LoRA at
strength 1 side by side, and the share of 16 prompts asking for the LoRA's trigger colour in which the judge reads
it, at strengths 1 and 0; last line `nano_lora: rate_with=R rate_without=R0 color_drop=C motion_drop=M`.

Prints one verdict per run, the image-to-video direction accuracy, the paraphrase lines
`paraphrase[PART]: ...`, `paraphrase verbatim: ...` and `paraphrase: color_acc=C motion_acc=M n=N`, the time of
each stage of one default generation, and last the line
`nano: color_acc=C motion_acc=M extend_continuity=X`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from sora.nano import data, judge, recaption
from sora.nano import vocabulary as vocab
from sora.nano.pipeline import NanoPipeline

TESTS = Path(__file__).resolve().parent.parent / "tests" / "data"
HELD_OUT = TESTS / "nano_paraphrases.json"
DEVELOPMENT = TESTS / "nano_dev_paraphrases.json"
PARAPHRASE_SEED = 300  # prompt i samples (and recaptions) with seed PARAPHRASE_SEED + i

EXTEND_BASE_FRAMES = 17  # 5 latent frames
EXTEND_OVERLAP = 2  # latent frames the extension is conditioned on
EXTEND_NEW = 4  # latent frames it adds


def cases() -> list[tuple[str, str, str, int]]:
    """(colour, direction, caption, seed) for every colour x direction."""
    out = []
    for i, (color, direction) in enumerate((c, d) for c in sorted(vocab.COLORS) for d in sorted(vocab.DIRECTIONS)):
        caption = data.make_clip(5000 + i, color=color, direction=direction).caption
        out.append((color, direction, caption, 100 + i))
    return out


def _fit(pipe: NanoPipeline, prompt: str) -> str:
    """The prompt as typed, cut to the tokens the DiT reads (its text_len, [CLS] and [SEP] included)."""
    tokenizer, limit = pipe.encoder.tokenizer, pipe.dit.config.text_len
    ids = tokenizer(prompt)["input_ids"]
    return prompt if len(ids) <= limit else tokenizer.decode(ids[1:limit - 1])


def paraphrases(pipe: NanoPipeline, out: Path | None) -> None:
    """The held-out paraphrases through the main job (recaptioned) and as typed; prints the paraphrase lines."""
    items = json.loads(HELD_OUT.read_text())["prompts"]
    scores: dict[str, list[int]] = {}  # run -> [colour hits, direction hits, n]
    print(f"paraphrases through the main job (recaption, then 64x64, 33 frames), {HELD_OUT.name}:")
    for i, item in enumerate(items):
        seed = PARAPHRASE_SEED + i
        result = recaption.recaption_nano(item["prompt"], seed=seed, encoder=pipe.encoder)
        for run, prompt in (("recaption", result.caption), ("verbatim", _fit(pipe, item["prompt"]))):
            video = pipe.decode(pipe.text_to_latent([prompt], seed))[0]
            verdict = judge.judge_video(video)
            color_ok, motion_ok = verdict.color == item["color"], verdict.direction == item["direction"]
            for key in (run, f"{run}[{item['part']}]"):
                hits = scores.setdefault(key, [0, 0, 0])
                hits[0], hits[1], hits[2] = hits[0] + color_ok, hits[1] + motion_ok, hits[2] + 1
            if run == "recaption":
                print(f"  {i:2d} seed {seed} [{item['part']}] {item['prompt'][:70]!r} -> {prompt!r}: colour "
                      f"{verdict.color} {'ok' if color_ok else 'MISS'} ({item['color']}), direction "
                      f"{verdict.direction} {'ok' if motion_ok else 'MISS'} ({item['direction']})")
                for note in result.notes:
                    print(f"       {note}")
            else:
                print(f"       as typed: colour {verdict.color} {'ok' if color_ok else 'MISS'}, direction "
                      f"{verdict.direction} {'ok' if motion_ok else 'MISS'}")
            write(out, f"paraphrase_{i:02d}_{run}", video)

    def line(key: str) -> str:
        color, motion, n = scores[key]
        return f"color_acc={color / n:.2f} motion_acc={motion / n:.2f} n={n}"

    for part in sorted({item["part"] for item in items}):
        print(f"paraphrase[{part}]: {line(f'recaption[{part}]')} (as typed: {line(f'verbatim[{part}]')})")
    print(f"paraphrase verbatim: {line('verbatim')}")
    print(f"paraphrase: {line('recaption')}")


def calibrate() -> None:
    """The similarity threshold sweep on the development set, at text level: for each concept and threshold, the
    prompts whose concept was guessed right, and the false guesses where the prompt names none."""
    items = json.loads(DEVELOPMENT.read_text())["prompts"]
    encoder = recaption.default_encoder()
    sweeps = {"direction": [0.4, 0.45, 0.5, 0.55, 0.6, 0.7], "color slot": [0.3, 0.35, 0.4, 0.45, 0.5],
              "color": [0.45, 0.5, 0.55, 0.6, 0.7]}
    print(f"threshold sweep on {DEVELOPMENT.name} ({len(items)} prompts; in use: {recaption.THRESHOLDS}):")
    for key, values in sweeps.items():
        concept = "color" if key.startswith("color") else key
        named = sum(item[concept] is not None for item in items)
        for value in values:
            right = false = 0
            for item in items:
                found = recaption.recaption_nano(item["prompt"], encoder=encoder, thresholds={key: value})
                finding = found.findings[concept]
                if item[concept] is None:
                    false += finding.how == "guessed"
                else:
                    right += finding.value == item[concept] and finding.how != "seed"
            print(f"  {key:<10} {value:.2f}: right {right}/{named}, false guesses {false}/{len(items) - named}")


def text_to_video(pipe: NanoPipeline, label: str, out: Path | None) -> tuple[float, float]:
    """The 32 colour x direction prompts; returns (colour accuracy, direction accuracy)."""
    color_hits = motion_hits = 0
    for i, (color, direction, caption, seed) in enumerate(cases()):
        video = pipe.decode(pipe.text_to_latent([caption], seed))[0]
        verdict = judge.judge_video(video)
        color_hits += verdict.color == color
        motion_hits += verdict.direction == direction
        write(out, f"{label}_t2v_{i:02d}", video)
    n = len(cases())
    print(f"  {label}: color_acc={color_hits / n:.2f} motion_acc={motion_hits / n:.2f} n={n}")
    return color_hits / n, motion_hits / n


def lora_quality(pipe: NanoPipeline, file: Path, out: Path | None) -> None:
    """A nano LoRA against the base model: the usual prompts, and its trigger colour at strengths 1 and 0."""
    from sora.checkpoints import read_metadata
    from sora.handle import ModelHandle
    from sora.lora import apply_lora, read_lora
    from sora.nano import train_lora

    trigger = read_metadata(file).get("sora.trigger")
    if trigger not in vocab.EXTRA_COLORS:
        raise SystemExit(f"{file} names no nano trigger colour (sora.trigger: {trigger!r})")
    lora, base = read_lora(file), ModelHandle(pipe.dit, "nano_dit")
    with_lora = {s: dataclasses.replace(pipe, dit=base.patched(*apply_lora(lora, pipe.dit, s).patches))
                 for s in (1.0, 0.0)}
    print(f"{file.name} (trigger {trigger!r}), text-to-video (64x64, 33 frames):")
    color, motion = text_to_video(pipe, "base", out)
    color_lora, motion_lora = text_to_video(with_lora[1.0], "lora", out)
    rate_with = train_lora.new_color_rate(with_lora[1.0], trigger)
    rate_without = train_lora.new_color_rate(with_lora[0.0], trigger)
    print(f"  {trigger} read in {rate_with:.2f} of 16 prompts at strength 1, {rate_without:.2f} at strength 0")
    print(f"nano_lora: rate_with={rate_with:.2f} rate_without={rate_without:.2f} "
          f"color_drop={color - color_lora:.2f} motion_drop={motion - motion_lora:.2f}")


def write(out: Path | None, name: str, video: torch.Tensor) -> None:
    if out is not None:
        from sora.video_io import write_mp4

        write_mp4(out / f"{name}.mp4", (video.permute(1, 2, 3, 0) + 1) / 2, fps=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="also write every clip as an mp4 here")
    parser.add_argument("--dit", type=Path, default=None, help="score this nano DiT file instead of the shipped one")
    parser.add_argument("--only", choices=["paraphrase", "calibrate"], default=None,
                        help="run only the held-out paraphrases, or only the threshold sweep on the development set")
    parser.add_argument("--lora", type=Path, default=None, help="score this nano LoRA against the base model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.only == "calibrate":
        calibrate()
        return

    started = time.perf_counter()
    pipe = NanoPipeline.load(args.dit)
    load_s = time.perf_counter() - started
    if args.only == "paraphrase":
        paraphrases(pipe, args.out)
        return
    if args.lora is not None:
        lora_quality(pipe, args.lora, args.out)
        return
    timings: dict[str, list[float]] = {"encode prompt": [], "sample (20 steps, CFG)": [], "VAE decode": []}

    print("text-to-video (64x64, 33 frames):")
    color_hits = motion_hits = 0
    all_cases = cases()
    for i, (color, direction, caption, seed) in enumerate(all_cases):
        t0 = time.perf_counter()
        pipe.encode([caption])
        t1 = time.perf_counter()
        latent = pipe.text_to_latent([caption], seed)
        t2 = time.perf_counter()
        video = pipe.decode(latent)[0]
        t3 = time.perf_counter()
        for key, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2)):
            timings[key].append(seconds)
        verdict = judge.judge_video(video)
        color_ok, motion_ok = verdict.color == color, verdict.direction == direction
        color_hits += color_ok
        motion_hits += motion_ok
        print(f"  {i:2d} seed {seed} {caption!r}: colour {verdict.color} ({verdict.color_confidence:.2f}) "
              f"{'ok' if color_ok else 'MISS'}, direction {verdict.direction} ({verdict.direction_confidence:.2f}) "
              f"{'ok' if motion_ok else 'MISS'}")
        write(args.out, f"t2v_{i:02d}", video)

    print(f"extension ({EXTEND_BASE_FRAMES} frames + {4 * EXTEND_NEW} new, conditioned on {EXTEND_OVERLAP} latent "
          "frames):")
    continued = 0
    for i, (_, _, caption, seed) in enumerate(all_cases):
        clip = pipe.text_to_latent([caption], seed, frames=EXTEND_BASE_FRAMES)
        joined = pipe.extend_latent(clip, [caption], seed + 1000, EXTEND_OVERLAP, EXTEND_NEW)
        video = pipe.decode(joined)[0]
        result = judge.continuity(video, join=EXTEND_BASE_FRAMES)
        continued += result.continues
        print(f"  {i:2d} seed {seed} {caption!r}: before {result.before.direction}, after {result.after.direction}, "
              f"jump {result.jump:.1f}px (limit {result.limit:.1f}) {'ok' if result.continues else 'MISS'}")
        write(args.out, f"extend_{i:02d}", video)

    print("image-to-video (one first frame, the object in the middle, asked all four directions with one seed):")
    i2v_hits = i2v_runs = 0
    for i, color in enumerate(sorted(vocab.COLORS)):
        first, scene = data.centred_first_frame(900 + i, color=color)
        for direction in sorted(vocab.DIRECTIONS):
            caption = f"a {color} {scene.shape} {vocab.DIRECTION_PHRASES[direction][0]}"
            video = pipe.decode(pipe.image_to_latent(first[None], [caption], seed=i))[0]
            verdict = judge.judge_video(video)
            i2v_hits += verdict.direction == direction
            i2v_runs += 1
            print(f"  {i:2d} {caption!r}: direction {verdict.direction} "
                  f"{'ok' if verdict.direction == direction else 'MISS'}")
            write(args.out, f"i2v_{i:02d}_{direction}", video)
    print(f"image-to-video: motion_acc={i2v_hits / i2v_runs:.2f}")
    paraphrases(pipe, args.out)

    print("\none default generation on this machine (median over the text-to-video runs), seconds:")
    print(f"  {'stage':<26} {'seconds':>8}")
    print(f"  {'load DiT + VAE + MiniLM':<26} {load_s:8.2f}")
    for key, values in timings.items():
        print(f"  {key:<26} {statistics.median(values):8.2f}")
    total = load_s + sum(statistics.median(v) for v in timings.values())
    print(f"  {'total, with loading':<26} {total:8.2f}")
    n = len(all_cases)
    print(f"nano: color_acc={color_hits / n:.2f} motion_acc={motion_hits / n:.2f} "
          f"extend_continuity={continued / n:.2f}")


if __name__ == "__main__":
    main()
