"""The shipped nano LoRA teaches the nano DiT a colour it cannot make without it (black), applied the way the nodes
apply a LoRA (`read_lora`, `apply_lora`, a `ModelHandle`); the judge reads that colour and still reads the eight;
the trainer runs end to end. weights/MODEL_CARD.md has the full measurement."""
from pathlib import Path

import pytest
import torch

from sora import nano
from sora.checkpoints import read_metadata
from sora.errors import InputError
from sora.handle import ModelHandle
from sora.lora import apply_lora, read_lora
from sora.nano import data, judge, train_lora
from sora.nano import vocabulary as vocab
from sora.nano.pipeline import NanoPipeline

LORA = nano.WEIGHTS / "nano_black_lora.safetensors"
NEW = "black"


def test_the_judge_reads_the_new_colour_and_still_the_eight_on_generator_clips():
    for color in [*vocab.COLORS, NEW]:
        for seed, direction in enumerate(sorted(vocab.DIRECTIONS)):
            clip = data.make_clip(seed, frames=17, color=color, direction=direction)
            verdict = judge.judge_video(clip.video)
            assert (verdict.color, verdict.direction) == (color, direction), (clip.scene, verdict)
            assert verdict.color_confidence > 0.3
    for background in ("gray", "light"):
        assert judge.judge_video(data.make_clip(7, color=NEW, background=background).video).color == NEW


def test_the_generator_draws_the_new_colour_only_when_asked():
    assert NEW in vocab.EXTRA_COLORS and NEW not in vocab.COLORS
    assert {data.make_clip(seed, frames=1).scene.color for seed in range(300)} == set(vocab.COLORS)
    clip = data.make_clip(0, color=NEW, background="gray")
    assert f" {NEW} " in clip.caption
    rgb = (clip.video + 1) / 2
    x, y = clip.scene.centre(0)
    assert torch.allclose(rgb[:, 0, int(y), int(x)], torch.tensor(vocab.EXTRA_COLORS[NEW]), atol=1e-6)
    with pytest.raises(InputError, match="too faint"):
        data.make_clip(0, color=NEW, background="dark")  # black on the black background
    with pytest.raises(InputError, match="choose one of black, blue"):
        data.make_clip(0, color="magenta")


def test_the_nano_vae_keeps_the_new_colour_on_the_gray_background(pipeline):
    clips = [train_lora.new_color_clip(train_lora.LoraTrainConfig(frames=17), i) for i in range(4)]
    with torch.inference_mode():
        videos = pipeline.vae.decode(pipeline.vae.encode(torch.stack([c.video for c in clips])))
    assert [judge.judge_video(v).color for v in videos] == [NEW] * 4


def test_the_shipped_lora_file_is_small_and_applies_fully_in_the_original_layout(pipeline):
    assert LORA.stat().st_size < 2**20
    metadata = read_metadata(LORA)
    assert metadata["sora.trigger"] == NEW and metadata["sora.family"] == "nano"
    lora = read_lora(LORA)
    assert lora.layout == "original" and not lora.unused
    applied = apply_lora(lora, pipeline.dit, 1.0, name=LORA.name)
    assert applied.matched_keys == applied.total_keys == 3 * len(lora.patches) and not applied.unmatched
    assert all(t.startswith(("blocks.", "text_embedding.")) for t in lora.patches)


@pytest.fixture(scope="module")
def pipeline():
    return NanoPipeline.load()


def _rate(pipeline, model) -> float:
    """New-colour rate of the 16 prompts at 17 frames (the model card's figures are at 33)."""
    return train_lora.new_color_rate(NanoPipeline(dit=model, vae=pipeline.vae, encoder=pipeline.encoder), NEW,
                                     count=16, frames=17)


def test_the_lora_teaches_the_new_colour_and_strength_zero_is_the_base_model(pipeline):
    lora = read_lora(LORA)
    base = ModelHandle(pipeline.dit, "nano_dit")
    assert _rate(pipeline, base.patched(*apply_lora(lora, pipeline.dit, 1.0).patches)) >= 0.8
    assert _rate(pipeline, pipeline.dit) <= 0.1
    prompts = train_lora.new_color_prompts(NEW, 4)
    zero = NanoPipeline(dit=base.patched(*apply_lora(lora, pipeline.dit, 0.0).patches), vae=pipeline.vae,
                        encoder=pipeline.encoder)
    assert torch.equal(zero.text_to_latent(prompts, seed=3, frames=9), pipeline.text_to_latent(prompts, 3, frames=9))


def test_the_trainer_runs_end_to_end_and_learns_through_the_handle(tmp_path):
    out = tmp_path / "tiny.safetensors"
    train_lora.main(["--out", str(out), "--steps", "3", "--rank", "2", "--new-clips", "2", "--replay-clips", "2",
                     "--backdrop-clips", "2", "--batch", "2", "--replay-batch", "2", "--no-eval"])
    assert read_metadata(out)["sora.trigger"] == NEW
    lora = read_lora(out)
    patches = [p for plist in lora.patches.values() for p in plist]
    assert lora.layout == "original" and len(patches) == 42 and all(p.rank == 2 and p.alpha == 2 for p in patches)
    # up starts at zero and only gradients through ops.Linear's low-rank path can move it
    assert all(p.up.abs().sum() > 0 for p in patches)


def test_backdrop_captions_name_the_backdrop():
    cfg = train_lora.LoraTrainConfig()
    for i in range(4):
        clip = train_lora.backdrop_clip(cfg, i)
        captions = train_lora.backdrop_captions(clip, i, 3)
        assert clip.scene.background == "dark" and len(set(captions)) == 3
        assert all(c.endswith("against a black backdrop") and f" {clip.scene.color} " in c for c in captions)


def test_the_shipped_nano_lora_workflow_makes_black_and_strength_zero_does_not(tmp_path, monkeypatch):
    import json

    from sora import runtime, workflow
    from sora.video_io import read_video
    path = Path(__file__).resolve().parent.parent / "workflows" / "nano_t2v_lora.json"
    ids = {node["type"]: node["id"] for node in json.loads(path.read_text())["nodes"]}
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    colors = {}
    for strength in (1.0, 0.0):
        (file,) = workflow.run(path, output_dir=tmp_path / str(strength),
                               overrides=[f"{ids['SoraLoraLoader']}.strength={strength}"])
        video = read_video(file).frames.permute(3, 0, 1, 2) * 2 - 1  # [F, H, W, 3] in 0..1 -> [3, F, H, W]
        colors[strength] = judge.judge_video(video).color
    assert colors[1.0] == NEW and colors[0.0] in vocab.COLORS
