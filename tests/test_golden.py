"""Golden latents: full nano runs through the nodes, compared with latents saved before the sampler was rebuilt.

A refactor of the sampler, the guider or the model handle must leave these runs as they were. The tolerance is
float32 rounding across CPUs (another machine's kernels may round a little differently); a change of meaning (a
step, a scale, noise drawn differently, a frame kept or not) moves the latent by orders of magnitude more.

Regenerate only when a change of output is intended: SORA_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sora import runtime
from sora.nodes import load_node_mappings

pytestmark = pytest.mark.usefixtures("fresh_manager")

GOLDEN = Path(__file__).resolve().parent / "golden"
NODES = load_node_mappings()[0]
RELATIVE = 1e-5  # of the latent's largest magnitude


def node(name: str):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)


def nano_models():
    (dit,) = node("SoraModelLoader")("nano (embedded)", "default", "auto", "sdpa", "auto (from the file name)")
    (encoder,) = node("SoraTextEncoderLoader")("minilm (embedded)", "default", "auto")
    (vae,) = node("SoraVAELoader")("nano (embedded)", "auto")
    return dit, encoder, vae


def text_to_video() -> torch.Tensor:
    """The main job (workflows/nano_t2v.json) up to the sampler."""
    dit, encoder, _ = nano_models()
    positive, negative = node("SoraTextEncode")(encoder, "a red circle moving to the right on a dark background",
                                                "none", "")
    (sigmas,) = node("SoraScheduler")(dit, 20, 0.0, "wan_unipc", 1.0)
    (latent,) = node("SoraEmptyLatentVideo")(dit, 64, 64, 33, 1)
    return node("SoraSampler")(model=dit, positive=positive, negative=negative, latent=latent, sigmas=sigmas, seed=42,
                               guidance=5.0, sampler_name="unipc", denoise=1.0)[0]["samples"]


def image_to_video_dpm() -> torch.Tensor:
    """Known frames (per-token timesteps) with DPM++ 2M and a batch of two prompts' worth of seeds."""
    dit, encoder, vae = nano_models()
    frames = torch.zeros(1, 64, 64, 3)
    frames[:, 20:36, 8:24] = torch.tensor([0.2, 0.4, 0.95])
    (encoded,) = node("SoraVAEEncode")(vae, frames, "auto", 512, 64)
    (condition,) = node("SoraImageToVideo")(encoded, 17)
    positive, negative = node("SoraTextEncode")(encoder, "a blue square moving up", "none", "")
    (sigmas,) = node("SoraScheduler")(dit, 8, 0.0, "wan_dpm", 1.0)
    return node("SoraSampler")(model=dit, positive=positive, negative=negative, latent=condition, sigmas=sigmas,
                               seed=7, guidance=4.0, sampler_name="dpm++_2m", denoise=1.0)[0]["samples"]


RUNS = {"nano_t2v_unipc": text_to_video, "nano_i2v_dpm": image_to_video_dpm}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_full_nano_run_gives_the_golden_latent(name, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    latent = RUNS[name]()
    path = GOLDEN / f"{name}.safetensors"
    if os.environ.get("SORA_WRITE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        save_file({"latent": latent.contiguous()}, str(path))
    golden = load_file(str(path))["latent"]
    assert latent.shape == golden.shape
    error = (latent - golden).abs().max().item()
    assert error <= RELATIVE * golden.abs().max().item(), f"{name}: max difference {error:.3g}"
