"""The embedded nano model: a small text-to-video model this package trains and ships, so that a fresh machine
with no downloads makes a real, prompt-following video on the CPU in seconds.

It uses the pack's own code paths: `sora.dit.WanDiT` with a small config, `sora.vae.WanVAE` with small widths,
and the MiniLM text encoder (`sora.text.load_minilm`). Its world is closed (`vocabulary`): one circle, square or
triangle in a named colour moving in a named direction on a plain background (`data`); `judge` reads colour and
direction back from a clip. `train_vae`, `train_dit` and `train_lora` are the training scripts; `weights/` holds
the shipped files (the DiT, the VAE and a LoRA that teaches the colour black) and their model card.

The latent format "nano" (per-channel statistics stored in the shipped VAE file) is read when it is first asked
for (`sora.latent_formats.format_of`); the sampling defaults are `sora.schedules.DEFAULTS["nano"]`. `recaption`
rewrites a user's prompt into the captions the model was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import lazy_submodules
from ..checkpoints import read_metadata
from ..errors import CheckpointError
from ..latent_formats import LatentFormat
from ..schedules import DEFAULTS as TASK_DEFAULTS

WEIGHTS = Path(__file__).resolve().parent / "weights"
DIT_FILE = WEIGHTS / "nano_dit.safetensors"
VAE_FILE = WEIGHTS / "nano_vae.safetensors"
LORA_FILE = WEIGHTS / "nano_black_lora.safetensors"  # teaches the colour black (train_lora)

# The settings the model was trained and measured with (see weights/MODEL_CARD.md): 64x64, 33 frames.
DEFAULTS = TASK_DEFAULTS["nano"]
WIDTH = HEIGHT = 64
TEXT_TOKENS = 32  # MiniLM tokens the DiT reads (its text_len, [CLS] and [SEP] included): the encoder's window


def _shipped(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"the embedded nano model file {path.name} is missing from {path.parent}; reinstall "
                              "the package (pip install -e .) or train it with python -m sora.nano.train_vae / "
                              "train_dit")
    return path


def dit_path() -> Path:
    """The shipped nano DiT (`sora.dit.load_dit` reads it)."""
    return _shipped(DIT_FILE)


def vae_path() -> Path:
    """The shipped nano VAE (`sora.vae.load_vae` reads it)."""
    return _shipped(VAE_FILE)


def lora_path() -> Path:
    """The shipped nano LoRA (`sora.lora.read_lora` reads it)."""
    return _shipped(LORA_FILE)


def latent_format_from_metadata(metadata: dict[str, str]) -> LatentFormat:
    """The "nano" `LatentFormat` described by a nano file's `sora.latent_stats` safetensors metadata."""
    try:
        stats = json.loads(metadata["sora.latent_stats"])
        return LatentFormat(name="nano", channels=len(stats["mean"]), spatial=stats["spatial"],
                            temporal=stats["temporal"], mean=tuple(stats["mean"]), std=tuple(stats["std"]),
                            rgb_factors=tuple(tuple(row) for row in stats["rgb_factors"]),
                            rgb_bias=tuple(stats["rgb_bias"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the nano file's metadata has no valid sora.latent_stats ({e!r}); "
                              "retrain or reinstall it") from None


def latent_format_metadata(fmt: LatentFormat) -> dict[str, str]:
    """The safetensors metadata entry that `latent_format_from_metadata` reads back."""
    stats = dict(spatial=fmt.spatial, temporal=fmt.temporal, mean=list(fmt.mean), std=list(fmt.std),
                 rgb_factors=[list(row) for row in fmt.rgb_factors], rgb_bias=list(fmt.rgb_bias))
    return {"sora.latent_stats": json.dumps(stats)}


def shipped_latent_format() -> LatentFormat:
    """The "nano" latent format of the shipped VAE."""
    return latent_format_from_metadata(read_metadata(vae_path()))


__getattr__ = lazy_submodules(__name__)  # `sora.nano.recaption`, `sora.nano.judge`, ... load on first use
