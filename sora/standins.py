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
    DIR/diffusion_models/wan2.1-t2v-14b-Q4_K_M.gguf          city96's GGUF layout: block Linears in Q4_K (v and
                                                             ffn.2 in Q6_K, as Q4_K_M files have them)
    DIR/diffusion_models/wan2.1-t2v-14b-Q8_0.gguf            the same layout in Q8_0
    DIR/text_encoders/umt5-xxl-encoder-Q8_0.gguf             umT5 in llama.cpp's T5 names, Q8_0, with its
                                                             tokenizer in the GGUF metadata
    DIR/diffusion_models/wan2.1_i2v_480p_14B_fp16.safetensors  Wan 2.1 I2V-14B: 36 input channels and the CLIP
                                                             image branch (img_emb, k_img / v_img), fp16
    DIR/diffusion_models/wan2.1_flf2v_720p_14B_fp16.safetensors  Wan 2.1 FLF2V-14B: as I2V plus the learned
                                                             positions of two images (img_emb.emb_pos)
    DIR/clip_vision/clip_vision_h.safetensors                ComfyUI's CLIP vision layout (transformers names)
    DIR/diffusion_models/wan2.1_vace_1.3B_fp16.safetensors   Wan 2.1 VACE: the T2V DiT plus the VACE patch
                                                             embedding and hint blocks (vace_blocks.N), fp16

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
from .clip_vision import CLIP_VISION_TINY, CLIPVisionEncoder
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
# Wan 2.1 I2V-14B and FLF2V-14B: the I2V experts' channels plus the CLIP image branch, as wide as the stand-in
# CLIP vision model's tokens (FLF2V: learned positions for two images)
WAN21_I2V_DIT_STANDIN = DiTConfig(model_type="i2v", in_dim=36, out_dim=16, image_dim=CLIP_VISION_TINY.hidden_size,
                                  **_DIT_SHAPE)
WAN21_FLF2V_DIT_STANDIN = DiTConfig(model_type="flf2v", in_dim=36, out_dim=16, image_dim=CLIP_VISION_TINY.hidden_size,
                                    image_positions=2 * CLIP_VISION_TINY.num_tokens, **_DIT_SHAPE)
# Wan 2.1 VACE: a VACE hint block beside each of the two main blocks (1.3B: 15 beside 30, every second one)
WAN21_VACE_DIT_STANDIN = DiTConfig(model_type="t2v", in_dim=16, out_dim=16, vace_layers=(0, 1), **_DIT_SHAPE)
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
    folder: str  # model folder kind: diffusion_models, text_encoders, vae, loras
    filename: str
    build: Callable[[], StateDict]
    write: Callable[[Path, StateDict], None] | None = None  # None: a safetensors file


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


def _clip_vision(seed: int) -> Callable[[], StateDict]:
    """ComfyUI's clip_vision_h.safetensors layout (transformers' CLIPVisionModelWithProjection names), fp16."""
    def build() -> StateDict:
        return {k: v.half() for k, v in _seeded(seed, lambda: CLIPVisionEncoder(CLIP_VISION_TINY)).state_dict().items()}
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


# ----------------------------------------------------------------------------------------------------------------
# GGUF stand-ins: city96's layout (original key names, arch "wan" / "t5encoder", small tensors in F32)
# ----------------------------------------------------------------------------------------------------------------

GGUF_DIT_STANDIN = DiTConfig(model_type="t2v", in_dim=16, out_dim=16, dim=256, ffn_dim=512, num_heads=2, num_layers=2,
                             text_dim=UMT5_STANDIN.d_model, freq_dim=256)  # rows of 256: K-quants need them
_GGUF_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight$|^blocks\.\d+\.ffn\.[02]\.weight$")
_Q4_K_M_HIGHER = re.compile(r"\.(v|ffn\.2)\.weight$")  # llama-quantize's Q4_K_M keeps these in Q6_K


def random_k_blocks(qtype: int, rows: int, row_bytes: int, seed: int) -> torch.Tensor:
    """Valid random Q2_K..Q6_K blocks (uint8 [rows, row_bytes]) with small fp16 super-block scales: the values of a
    stand-in (gguf-py cannot quantise K-quants; its dequantiser reads these as any other blocks)."""
    from .gguf import GGML_TYPES

    t = GGML_TYPES[qtype]
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows * row_bytes // t.type_size, t.type_size), generator=generator,
                           dtype=torch.uint8)
    scale = torch.tensor([0.0005], dtype=torch.float16).view(torch.uint8)
    offsets = {10: (t.type_size - 4, t.type_size - 2), 11: (t.type_size - 2,), 12: (0, 2), 13: (0, 2),
               14: (t.type_size - 2,)}[qtype]  # where d (and dmin) sit in the block
    for offset in offsets:
        blocks[:, offset:offset + 2] = scale
    return blocks.reshape(rows, row_bytes)


def _write_gguf(architecture: str, quantise: Callable[[str, torch.Tensor], int | None],
                metadata: Callable[[object], None] = lambda writer: None) -> Callable[[Path, StateDict], None]:
    """A GGUF writer for a stand-in: `quantise(name, tensor)` picks each tensor's ggml type (None: F32 for small
    and 1-D tensors and modulation, F16 for the rest, as city96's converter writes the base file)."""
    def write(path: Path, tensors: StateDict) -> None:
        import gguf

        from .gguf import row_bytes

        writer = gguf.GGUFWriter(str(path), arch=architecture)
        metadata(writer)
        for number, (name, tensor) in enumerate(tensors.items()):
            array = tensor.float().numpy()
            qtype = quantise(name, tensor)
            if qtype is None:
                small = array.ndim == 1 or array.size <= 1024 or "modulation" in name
                writer.add_tensor(name, array if small else array.astype("float16"))
            elif qtype in (2, 3, 6, 7, 8):
                blocks = gguf.quants.quantize(array, gguf.GGMLQuantizationType(qtype))
                writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))
            else:
                blocks = random_k_blocks(qtype, array.shape[0], row_bytes(qtype, array.shape[1]), number).numpy()
                writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return write


def _gguf_dit(config: DiTConfig, seed: int) -> Callable[[], StateDict]:
    def build() -> StateDict:
        model = _seeded(seed, lambda: WanDiT(config))
        return {k: v for k, v in model.state_dict().items() if not k.endswith("scale_weight")}  # no prefix
    return build


def _q4_k_m(name: str, tensor: torch.Tensor) -> int | None:
    if not _GGUF_LINEAR.match(name):
        return None
    return 14 if _Q4_K_M_HIGHER.search(name) else 12  # Q6_K, Q4_K


_GGUF_T5_LINEAR = re.compile(r"\.(attn_[qkvo]|ffn_gate|ffn_up|ffn_down)\.weight$")  # llama.cpp's T5 names


def _q8_0(name: str, tensor: torch.Tensor) -> int | None:
    linear = _GGUF_LINEAR.match(name) or _GGUF_T5_LINEAR.search(name)
    return 8 if linear and tensor.ndim == 2 and tensor.shape[-1] % 32 == 0 else None


def _umt5(seed: int) -> Callable[[], StateDict]:
    """The stand-in umT5 in llama.cpp's T5 names (`enc.blk.N.attn_q`, ...), as city96's encoder GGUFs have it."""
    from .text import _GGUF_T5_NAMES

    def build() -> StateDict:
        model = _seeded(seed, lambda: UMT5Encoder(UMT5_STANDIN))
        tensors = {}
        for key, value in model.state_dict().items():
            if key.endswith("scale_weight"):
                continue
            for old, new in reversed(_GGUF_T5_NAMES):
                key = key.replace(new, old)
            tensors[key] = value
        return tensors
    return build


def _t5_tokenizer(writer) -> None:
    """The stand-in SentencePiece model as GGUF tokenizer metadata (what llama.cpp's converter writes for T5)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(spiece_model())
    ids = range(processor.get_piece_size())
    writer.add_tokenizer_model("t5")
    writer.add_token_list([processor.id_to_piece(i) for i in ids])
    writer.add_token_scores([processor.get_score(i) for i in ids])
    writer.add_token_types([3 if processor.is_control(i) else 2 if processor.is_unknown(i) else 6 if
                            processor.is_byte(i) else 5 if processor.is_unused(i) else 1 for i in ids])
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_pad_token_id(processor.pad_id())
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)


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
    StandIn("diffusion_models", "wan2.1-t2v-14b-Q4_K_M.gguf", _gguf_dit(GGUF_DIT_STANDIN, 12),
            _write_gguf("wan", _q4_k_m)),
    StandIn("diffusion_models", "wan2.1-t2v-14b-Q8_0.gguf", _gguf_dit(GGUF_DIT_STANDIN, 13), _write_gguf("wan", _q8_0)),
    StandIn("text_encoders", "umt5-xxl-encoder-Q8_0.gguf", _umt5(3), _write_gguf("t5encoder", _q8_0, _t5_tokenizer)),
    StandIn("diffusion_models", "wan2.1_i2v_480p_14B_fp16.safetensors", _dit(WAN21_I2V_DIT_STANDIN, torch.float16, 14)),
    StandIn("diffusion_models", "wan2.1_flf2v_720p_14B_fp16.safetensors",
            _dit(WAN21_FLF2V_DIT_STANDIN, torch.float16, 15)),
    StandIn("clip_vision", "clip_vision_h.safetensors", _clip_vision(16)),
    StandIn("diffusion_models", "wan2.1_vace_1.3B_fp16.safetensors", _dit(WAN21_VACE_DIT_STANDIN, torch.float16, 17)),
)


def write_standins(root: str | Path) -> list[Path]:
    """Write every stand-in under `root/<folder>/<filename>` (replacing older ones); returns the paths written."""
    root = Path(root)
    written = []
    for standin in STANDINS:
        path = root / standin.folder / standin.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in standin.build().items()}
        if standin.write is None:
            save_file(tensors, str(path), metadata=METADATA)
        else:
            standin.write(path, tensors)
        written.append(path)
    return written
