"""Tiny random stand-ins for the model files the shipped workflows name, for smoke tests without the real weights.

`write_standins(DIR)` (the command `sora stand-ins DIR`) writes, under the exact file names ComfyUI users have:

    DIR/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors   Wan 2.1 T2V DiT layout, bf16, ComfyUI prefix
    DIR/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors    Wan 2.2 TI2V DiT layout (48 latent channels), fp16
    DIR/diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors  Wan 2.2 I2V-A14B experts: 36 input channels
    DIR/diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors   (16 latent + 20 image), fp16, ComfyUI prefix
    DIR/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors  umT5 in ComfyUI's scaled-fp8 form, with a tiny
                                                             embedded SentencePiece model (`spiece_model`)
    DIR/vae/wan_2.1_vae.safetensors                          Wan 2.1 VAE layout: z_dim 16, 8x / 4x compression
    DIR/vae/wan2.2_vae.safetensors                           Wan 2.2 VAE layout: z_dim 48, 16x / 4x compression
    DIR/diffusion_models/wan2.1_t2v_14B_bf16.safetensors    the Wan 2.1 T2V 14B name (same tiny shapes as 1.3B)
    DIR/loras/wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors   lightx2v's distill LoRA layout: original
                                                             names, lora_down/up with alpha, diff_b, diff, diff_m
    DIR/loras/wan2.2_i2v_A14b_{high,low}_noise_lora_rank64_lightx2v_4step_1022.safetensors   the A14B pair's
                                                             LoRAs (lora_A/lora_B, no alpha)

The tensors follow the real key layouts and are detected by the loaders exactly like the real files (the DiTs have
128-channel heads, the umT5 width equals the DiTs' text_dim, the VAEs have the real latent channels and
compression), but every width is tiny and the weights are random, so `sora run --models-dir DIR` runs any shipped
workflow in seconds. The videos they make are noise. Files are the same bytes on every run (fixed seeds).
"""
from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoints import StateDict
from .dit import DiTConfig, WanDiT
from .text_umt5 import UMT5Config, UMT5Encoder
from .vae import VAEConfig, WanVAE

METADATA = {"description": "sora stand-in: tiny random weights in the real key layout, for smoke tests only"}
DIT_PREFIX = "model.diffusion_model."  # ComfyUI's repackaged DiT files carry it (ARCH_FACTS §1.6)

UMT5_STANDIN = UMT5Config(vocab_size=128, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=2)
# head_dim 128 as in every Wan release, so the loader infers the head count from the width as for real files
_DIT_SHAPE = dict(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=UMT5_STANDIN.d_model, freq_dim=256)
WAN21_DIT_STANDIN = DiTConfig(model_type="t2v", in_dim=16, out_dim=16, **_DIT_SHAPE)
WAN22_DIT_STANDIN = DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, latent_format="wan22",
                              per_token_timesteps=True, **_DIT_SHAPE)
# the two I2V-A14B experts: the same shapes, different random weights (as the real pair differs only in values)
WAN22_I2V_DIT_STANDIN = DiTConfig(model_type="i2v", in_dim=36, out_dim=16, **_DIT_SHAPE)
WAN21_VAE_STANDIN = VAEConfig(base_dim=8, decoder_base_dim=8, z_dim=16, num_res_blocks=1)
WAN22_VAE_STANDIN = VAEConfig(base_dim=8, decoder_base_dim=8, z_dim=48, num_res_blocks=1, patch_size=2,
                              residual_shortcuts=True)

# Sentences the stand-in tokenizer is trained on: enough pieces for English prompts, the rest maps to <unk>.
_TOKENIZER_TEXT = (
    "a red circle moving to the right", "a small blue square drifting upward on a dark background",
    "a cat surfing a wave at sunset, cinematic lighting", "the camera pans slowly across a quiet street",
    "a green triangle sliding left over a white background", "two dogs play in the snow, close-up shot",
)
_QUANTISED = re.compile(r"\.(q|k|v|o|wi_0|wi_1|wo)\.weight$")  # the Linear weights ComfyUI's fp8 file quantises
FP8_MAX = 448.0  # largest float8_e4m3fn value


@dataclass(frozen=True)
class StandIn:
    folder: str  # model folder kind: diffusion_models, text_encoders, vae
    filename: str
    build: Callable[[], StateDict]


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with torch's global generator seeded, without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
        for parameter in module.parameters():
            if parameter.ndim == 0 or not parameter.any():  # zero-initialised layers (the DiT head) get weights too
                parameter.data.normal_(0.0, 0.02)
    return module


def _dit(config: DiTConfig, dtype: torch.dtype, seed: int) -> Callable[[], StateDict]:
    def build() -> StateDict:
        model = _seeded(seed, lambda: WanDiT(config))
        return {DIT_PREFIX + k: v.to(dtype) for k, v in model.state_dict().items() if not k.endswith("scale_weight")}
    return build


def _vae(config: VAEConfig, dtype: torch.dtype, seed: int) -> Callable[[], StateDict]:
    def build() -> StateDict:
        return {k: v.to(dtype) for k, v in _seeded(seed, lambda: WanVAE(config)).state_dict().items()}
    return build


def _lora(config: DiTConfig, seed: int, *, rank: int = 4, alpha: bool = True, full_deltas: bool = True,
          down_up: tuple[str, str] = ("lora_down", "lora_up")) -> Callable[[], StateDict]:
    """A random LoRA for a DiT of `config` in the original layout under `diffusion_model.`: a low-rank pair on every
    Linear of the blocks (and the text/time embeddings and head), and, like lightx2v's distill LoRAs, `diff_b` on
    their biases, `diff` on the norms and `diff_m` on each block's modulation."""
    def build() -> StateDict:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in WanDiT(config).state_dict().items()}
        generator = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)
        tensors = {}
        for key, shape in shapes.items():
            base = "diffusion_model." + key.removesuffix(".weight").removesuffix(".bias")
            if key.endswith(".weight") and len(shape) == 2 and not key.startswith("patch_embedding"):
                tensors[f"{base}.{down_up[0]}.weight"] = rand(rank, shape[1])
                tensors[f"{base}.{down_up[1]}.weight"] = rand(shape[0], rank)
                if alpha:
                    tensors[f"{base}.alpha"] = torch.tensor(float(rank))
            elif full_deltas and key.endswith(".bias") and not key.startswith("patch_embedding"):
                tensors[f"{base}.diff_b"] = rand(*shape)
            elif full_deltas and key.endswith("modulation") and key.startswith("blocks."):
                tensors[f"diffusion_model.{key.rsplit('.', 1)[0]}.diff_m"] = rand(*shape)
            elif full_deltas and ("norm" in key) and key.endswith(".weight"):
                tensors[f"{base}.diff"] = rand(*shape)
        return tensors
    return build


def spiece_model() -> bytes:
    """A tiny SentencePiece model with umT5's special ids (pad 0, EOS 1, unk 2, no BOS); deterministic."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXT * 8), model_writer=buffer, vocab_size=UMT5_STANDIN.vocab_size,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    return buffer.getvalue()


def _umt5_scaled_fp8(seed: int) -> Callable[[], StateDict]:
    """ComfyUI's `umt5_xxl_fp8_e4m3fn_scaled` form: block Linears in float8_e4m3fn with a float32 scalar
    `scale_weight` each, a `scaled_fp8` marker, everything else fp16, and the tokenizer as a uint8 tensor."""
    def build() -> StateDict:
        model = _seeded(seed, lambda: UMT5Encoder(UMT5_STANDIN))
        tensors = {}
        for key, value in model.state_dict().items():
            if key.endswith("scale_weight"):
                continue
            if _QUANTISED.search(key):
                scale = value.abs().max().float() / FP8_MAX
                tensors[key] = (value / scale).to(torch.float8_e4m3fn)
                tensors[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            else:
                tensors[key] = value.half()
        tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
        tensors["spiece_model"] = torch.frombuffer(bytearray(spiece_model()), dtype=torch.uint8)
        return tensors
    return build


STANDINS: tuple[StandIn, ...] = (
    StandIn("diffusion_models", "wan2.1_t2v_1.3B_bf16.safetensors", _dit(WAN21_DIT_STANDIN, torch.bfloat16, 1)),
    StandIn("diffusion_models", "wan2.2_ti2v_5B_fp16.safetensors", _dit(WAN22_DIT_STANDIN, torch.float16, 2)),
    StandIn("diffusion_models", "wan2.2_i2v_high_noise_14B_fp16.safetensors",
            _dit(WAN22_I2V_DIT_STANDIN, torch.float16, 6)),
    StandIn("diffusion_models", "wan2.2_i2v_low_noise_14B_fp16.safetensors",
            _dit(WAN22_I2V_DIT_STANDIN, torch.float16, 7)),
    StandIn("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", _umt5_scaled_fp8(3)),
    StandIn("vae", "wan_2.1_vae.safetensors", _vae(WAN21_VAE_STANDIN, torch.bfloat16, 4)),
    StandIn("vae", "wan2.2_vae.safetensors", _vae(WAN22_VAE_STANDIN, torch.float32, 5)),
    StandIn("diffusion_models", "wan2.1_t2v_14B_bf16.safetensors", _dit(WAN21_DIT_STANDIN, torch.bfloat16, 8)),
    StandIn("loras", "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors", _lora(WAN21_DIT_STANDIN, 9)),
    StandIn("loras", "wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors",
            _lora(WAN22_I2V_DIT_STANDIN, 10, alpha=False, full_deltas=False, down_up=("lora_A", "lora_B"))),
    StandIn("loras", "wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors",
            _lora(WAN22_I2V_DIT_STANDIN, 11, alpha=False, full_deltas=False, down_up=("lora_A", "lora_B"))),
)


def write_standins(root: str | Path) -> list[Path]:
    """Write every stand-in under `root/<folder>/<filename>` (replacing older ones); returns the paths written."""
    root = Path(root)
    written = []
    for standin in STANDINS:
        path = root / standin.folder / standin.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in standin.build().items()}
        save_file(tensors, str(path), metadata=METADATA)
        written.append(path)
    return written
