"""The shipped nano model: its files load through the real loaders within the size budget, their latent
statistics agree everywhere they are kept, and short text-to-video and image-to-video generations follow the
colour and the direction of motion of their prompts, whatever the noise. benchmarks/nano_quality.py measures
more prompts, and extensions (see weights/MODEL_CARD.md)."""
import pytest
import torch

from sora import nano
from sora.checkpoints import read_metadata
from sora.dit import load_dit
from sora.latent_formats import FORMATS
from sora.nano import data, judge
from sora.nano import vocabulary as vocab
from sora.nano.pipeline import NanoPipeline
from sora.schedules import DEFAULTS
from sora.vae import load_vae

PHRASE = {"right": "moving to the right", "left": "moving to the left", "up": "moving up", "down": "moving down"}
# every colour once, every direction twice
CASES = [("red", "circle", "right"), ("green", "square", "up"), ("blue", "triangle", "left"),
         ("yellow", "circle", "down"), ("purple", "square", "right"), ("orange", "triangle", "up"),
         ("cyan", "circle", "left"), ("white", "square", "down")]


def test_shipped_files_load_with_the_real_loaders_within_budget():
    files = [nano.dit_path(), nano.vae_path(), nano.WEIGHTS / "MODEL_CARD.md"]
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    dit = load_dit(nano.dit_path(), compute_dtype=torch.float32)
    vae = load_vae(nano.vae_path())
    fmt = FORMATS["nano"]  # registered by importing sora.nano, from the shipped VAE file
    assert dit.config.latent_format == "nano" and dit.config.per_token_timesteps
    assert dit.config.in_dim == dit.config.out_dim == vae.config.z_dim == fmt.channels
    assert (vae.config.spatial_factor, vae.config.temporal_factor) == (fmt.spatial, fmt.temporal)
    assert nano.latent_format_from_metadata(read_metadata(nano.dit_path())) == fmt
    assert DEFAULTS["nano"] == nano.DEFAULTS


@pytest.fixture(scope="module")
def pipeline():
    return NanoPipeline.load()


def _generate(pipeline, colors, directions=None):
    """Judge one clip per colour; case i keeps its shape and (unless `directions` says otherwise) its direction,
    whatever colour it is asked for."""
    cases = CASES + CASES[::-1]
    directions = directions or [d for _, _, d in cases]
    prompts = [f"a {color} {shape} {PHRASE[d]}" for color, (_, shape, _), d in zip(colors, cases, directions)]
    videos = pipeline.decode(pipeline.text_to_latent(prompts, seed=0))
    return [judge.judge_video(v) for v in videos]


def test_a_short_generation_follows_the_colour_of_its_prompt(pipeline):
    asked = [c for c, _, _ in CASES] * 2  # 16 clips, every colour twice
    verdicts = _generate(pipeline, asked)
    assert sum(v.color == c for v, c in zip(verdicts, asked)) >= 13  # the bar: 0.8
    assert all(v.visible == 1.0 for v in verdicts)  # one object, seen in every frame
    # the same noise with the colour words rotated: the colours follow the words, not the noise
    rotated = asked[3:] + asked[:3]
    verdicts = _generate(pipeline, rotated)
    assert sum(v.color == c for v, c in zip(verdicts, rotated)) >= 13


def test_a_short_generation_follows_the_direction_of_its_prompt(pipeline):
    """Every direction four times, in every colour; then the same noise with every direction word turned a quarter,
    so the motion must follow the words."""
    colors = [c for c, _, _ in CASES] * 2
    for turn in ({}, {"right": "down", "down": "left", "left": "up", "up": "right"}):
        asked = [turn.get(d, d) for _, _, d in CASES + CASES[::-1]]
        verdicts = _generate(pipeline, colors, asked)
        # shipped weights: 16 and 15 of 16; weights trained with the object anywhere across the frame: 7 and 6; chance 4
        assert sum(v.direction == d for v, d in zip(verdicts, asked)) >= 12


def test_an_image_to_video_generation_follows_the_direction_of_its_prompt(pipeline):
    """One first frame per colour with the object in the middle, asked to move each of the four ways with the same
    noise: only the words differ, so the motion must come from them."""
    hits = runs = 0
    for i, color in enumerate(sorted(vocab.COLORS)[:4]):
        first, scene = data.centred_first_frame(900 + i, color=color)
        for direction, phrase in PHRASE.items():
            latent = pipeline.image_to_latent(first[None], [f"a {color} {scene.shape} {phrase}"], seed=i)
            hits += judge.judge_video(pipeline.decode(latent)[0]).direction == direction
            runs += 1
    assert hits >= 0.8 * runs  # the bar


def test_an_extension_carries_the_motion_across_the_join(pipeline):
    """17-frame clips, each continued by 16 frames conditioned on its last 2 latent frames (as in the benchmark):
    on both sides of the join the object moves the same way, and it does not jump at the join."""
    prompts = [f"a {color} {shape} {PHRASE[d]}" for color, shape, d in CASES]
    clips = pipeline.text_to_latent(prompts, seed=0, frames=17)
    videos = pipeline.decode(pipeline.extend_latent(clips, prompts, seed=1, overlap=2, new_frames=4))
    assert videos.shape[2] == 33
    results = [judge.continuity(v, join=17) for v in videos]
    # the shipped weights: 8 of 8; weights trained with 5-20% short clips instead of 35%: 5; the bar: 0.8
    assert sum(r.continues for r in results) >= 7
