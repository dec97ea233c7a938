"""The spacetime-patch diffusion transformer of Wan 2.1 / 2.2, and loading its checkpoints.

A video latent [C, T, H, W] is cut into (1, 2, 2) spacetime patches, one token each. Every block runs
self-attention over all tokens of the clip (3D RoPE gives each token its frame, row and column), cross-attention
to the text, and a feed-forward layer; the timestep enters through a 6-way shift/scale/gate modulation of each
block. The head predicts the flow-matching velocity v = noise - x0 of every patch.

Facts (names, shapes, constants, precision) follow the reference (`Wan-Video/Wan2.1` and `Wan2.2`
`wan/modules/model.py`), summarised in ARCH_FACTS §1. Module attribute names equal the original checkpoint keys, so
a Wan state dict loads without renaming.

Precision (§1.4): the time embedding, every modulation, the layer norms, the residual stream and the head run in
float32; the other matmuls and attention run in the compute dtype chosen with `WanDiT.set_compute`.

Layout of this file: config and presets, layers, the model, then checkpoint loading.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import ops
from .attention import attention, check_backend
from .attention import workspace_bytes as attention_workspace_bytes
from .checkpoints import StateDict, build, describe, load_state_dict, read_metadata, strip_prefix
from .errors import CheckpointError, InputError
from .rope import apply_rope, rope_table

# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------

# runs the block stack: blocks(run, tokens, e, e0) -> tokens, `run` being the plain loop (see `WanDiT.forward`)
BlockStack = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# self-attention over the whole sequence when each process holds a share of it: attend(q, k, v, key_counts=, backend=)
SelfAttend = Callable[..., torch.Tensor]


class TokenShard(Protocol):
    """This process's share of the token sequence, for sequence parallelism (`sora.parallel.SequenceShard`):
    `WanDiT.forward(sequence=...)` runs the blocks and the head on the share and gathers the output once."""

    def local(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[B, L, ...] -> [B, L_local, ...]: this share of dim 1, the sequence padded with `fill` to split evenly."""

    def key_counts(self, counts: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
        """Key multiplicities [B, L_padded] of the whole padded sequence of `tokens` [B, L, dim] (0 on padding),
        from `counts` [B, L] or None."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_counts: torch.Tensor | None,
               backend: str) -> torch.Tensor:
        """Self-attention of the local queries [B, L_local, heads, d] to the keys of every share."""

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """[B, L_local, C] of every share -> [B, length, C], the padding dropped."""

MODEL_TYPES = ("t2v", "i2v", "ti2v", "flf2v")
WAN_PATCH = (1, 2, 2)  # (frames, rows, cols) per token in every released Wan DiT
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan DiT. Defaults are Wan 2.1 T2V-14B; `PRESETS` holds the released sizes.

    model_type: 't2v' | 'ti2v' | 'i2v' (the conditioning latent and mask are concatenated to the noisy latent,
    in_dim 36: Wan 2.2 I2V-A14B, and Wan 2.1 I2V-14B, which also reads CLIP image tokens) | 'flf2v' (Wan 2.1
    first-last-frame: two images' CLIP tokens with learned positions).
    latent_format: key of sora.latent_formats.FORMATS the model works in.
    per_token_timesteps: the model was trained with a timestep per token, so tokens given t=0 stay clean
    (Wan 2.2 TI2V-5B, nano); samplers use it to decide how to keep known frames.
    image_dim: width of the CLIP image tokens the cross-attention reads through its own keys and values (1280,
    ViT-H/14; None: no image branch). image_positions: learned positions added to them (514 for FLF2V's two images).
    vace_layers: the main blocks a VACE hint is added to, in order (empty: no VACE branch); vace_in_dim: channels
    of the VACE context (96: inactive and reactive latents and the 64-channel mask).
    """

    model_type: str = "t2v"
    in_dim: int = 16  # latent channels in (36 for i2v: 16 noisy + 4 mask + 16 conditioning)
    out_dim: int = 16  # velocity channels out
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40  # head size dim / num_heads is 128 in every released Wan model
    num_layers: int = 40
    text_dim: int = 4096  # umT5-XXL width
    text_len: int = 512  # context rows the model was trained with; shorter contexts are zero-padded
    freq_dim: int = 256  # size of the sinusoidal timestep embedding
    patch_size: tuple[int, int, int] = WAN_PATCH  # (frames, rows, cols) per token
    eps: float = 1e-6
    rope_max_len: int = 1024  # RoPE positions per axis
    latent_format: str = "wan21"
    per_token_timesteps: bool = False
    image_dim: int | None = None
    image_positions: int = 0
    vace_layers: tuple[int, ...] = ()
    vace_in_dim: int = 96

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise InputError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.model_type == "flf2v" and (self.image_dim is None or not self.image_positions):
            raise InputError("an FLF2V model has an image branch with learned positions (image_dim, image_positions)")
        object.__setattr__(self, "vace_layers", tuple(int(i) for i in self.vace_layers))
        if any(not 0 <= i < self.num_layers for i in self.vace_layers) or \
                list(self.vace_layers) != sorted(set(self.vace_layers)):
            raise InputError(f"vace_layers {self.vace_layers} must be increasing block indices below {self.num_layers}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise InputError(f"dim {self.dim} must split into {self.num_heads} heads of an even size")
        if len(self.patch_size) != 3:
            raise InputError(f"patch_size must be (frames, rows, cols), got {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


_WAN21_1_3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
PRESETS: dict[str, DiTConfig] = {
    "wan21_t2v_1_3b": _WAN21_1_3B,
    "wan21_t2v_14b": DiTConfig(),
    "wan22_ti2v_5b": DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24,
                               num_layers=30, latent_format="wan22", per_token_timesteps=True),
    "wan22_t2v_a14b": DiTConfig(),  # each of the high- and low-noise experts
    "wan22_i2v_a14b": DiTConfig(model_type="i2v", in_dim=36),
    "wan21_i2v_14b": DiTConfig(model_type="i2v", in_dim=36, image_dim=1280),  # 480P and 720P share the shapes
    "wan21_flf2v_14b": DiTConfig(model_type="flf2v", in_dim=36, image_dim=1280, image_positions=514),
    "wan21_vace_1_3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                                 vace_layers=tuple(range(0, 30, 2))),
    "wan21_vace_14b": DiTConfig(vace_layers=tuple(range(0, 40, 5))),
    # A few-thousand-parameter model with the 1.3B's structure, for tests.
    "tiny": DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=24, text_len=8, freq_dim=16),
}


# ------------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] timesteps -> [N, dim] float32 [cos(t·f), sin(t·f)], f_j = 10000^(-j / (dim/2)), computed in float64."""
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.double(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without parameters (norm1, norm2 and the head's norm), in float32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads at once), statistic in float32, result in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], ops.patched(self, "weight"), self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm in float32 whatever the stored dtype of its weights (norm3, before cross-attention)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], ops.patched(self, "weight"), ops.patched(self, "bias"),
                            self.eps)


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm; self-attention (with RoPE) or cross-attention (without)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.backend = "sdpa"
        self.q = ops.Linear(dim, dim)
        self.k = ops.Linear(dim, dim)
        self.v = ops.Linear(dim, dim)
        self.o = ops.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, source: torch.Tensor, rotations: torch.Tensor | None = None,
                key_counts: torch.Tensor | None = None, attend: SelfAttend | None = None) -> torch.Tensor:
        """x [B, L, dim] attends to source [B, S, dim].

        rotations [B or 1, L, head_dim/2] for self-attention (RoPE); key_counts [B, S] as in `sora.attention`;
        attend: computes the attention instead of `sora.attention.attention` (sequence parallelism).
        """
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))  # [B, L, heads, head_dim]
        k = self.norm_k(self.k(source)).unflatten(2, (self.num_heads, -1))  # [B, S, heads, head_dim]
        v = self.v(source).unflatten(2, (self.num_heads, -1))
        if rotations is not None:
            q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        out = (attend or attention)(q, k, v, key_counts=key_counts, backend=self.backend)
        return self.o(out.flatten(2))


class CrossAttention(Attention):
    """Cross-attention to the text; with an image branch (Wan 2.1 I2V / FLF2V) also to the image tokens through
    their own keys and values (`k_img`, `v_img`, `norm_k_img`): o(attn(q, k, v) + attn(q, k_img, v_img)), one query
    for both, no mask on the image keys (ECOSYSTEM_FACTS §5.2)."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool):
        super().__init__(dim, num_heads, eps)
        if image:
            self.k_img = ops.Linear(dim, dim)
            self.v_img = ops.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, source: torch.Tensor, key_counts: torch.Tensor | None = None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, dim] attends to the text rows `source` [B, S, dim] and to `image` [B, N, dim] (embedded image
        tokens) when given."""
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))
        k = self.norm_k(self.k(source)).unflatten(2, (self.num_heads, -1))
        v = self.v(source).unflatten(2, (self.num_heads, -1))
        out = attention(q, k, v, key_counts=key_counts, backend=self.backend)
        if image is not None:
            k_img = self.norm_k_img(self.k_img(image)).unflatten(2, (self.num_heads, -1))
            v_img = self.v_img(image).unflatten(2, (self.num_heads, -1))
            out = out + attention(q, k_img, v_img, backend=self.backend)
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    """Modulated self-attention, cross-attention to the text, modulated feed-forward.

    The norms are used in the order norm1 (self-attention), norm3 (cross-attention, affine), norm2 (FFN): the
    reference's names. Only norm3 has parameters.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.self_attn = Attention(dim, config.num_heads, config.eps)
        self.norm3 = LayerNorm(dim, config.eps)
        self.cross_attn = CrossAttention(dim, config.num_heads, config.eps, image=config.image_dim is not None)
        self.ffn = nn.Sequential(ops.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 ops.Linear(config.ffn_dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_counts: torch.Tensor | None,
                e0: torch.Tensor, t_index: torch.Tensor, rotations: torch.Tensor,
                token_counts: torch.Tensor | None, image: torch.Tensor | None = None,
                attend: SelfAttend | None = None) -> torch.Tensor:
        """x [B, L, dim] float32 -> same.

        context [B, S, dim] embedded text rows and context_counts [B, S] their multiplicities (see
        `WanDiT._embed_context`); e0 [U, 6, dim] projected embeddings of the U distinct timesteps; t_index
        [B, 1 or L] which of them each sample or token has; rotations [B or 1, L, head_dim/2]; token_counts
        [B, L] 1 for real tokens, 0 for padding (None: no padding); image [B, N, dim] embedded image tokens;
        attend: the self-attention's kernel when the sequence is split across processes (`TokenShard.attend`).
        """
        # [U, 6, dim]: shift, scale, gate (attention), shift, scale, gate (FFN)
        mod = ops.patched(self, "modulation") + e0
        shift, scale, gate = (mod[:, i][t_index] for i in range(3))  # each [B, 1 or L, dim]
        h = torch.addcmul(shift, _layer_norm(x, self.eps), 1 + scale)
        x = torch.addcmul(x, self.self_attn(h, h, rotations, token_counts, attend).float(), gate)

        x = x + self.cross_attn(self.norm3(x), context, key_counts=context_counts, image=image).float()

        shift, scale, gate = (mod[:, i][t_index] for i in range(3, 6))
        h = torch.addcmul(shift, _layer_norm(x, self.eps), 1 + scale)
        return torch.addcmul(x, self.ffn(h).float(), gate)


class VaceBlock(WanBlock):
    """A VACE block (ECOSYSTEM_FACTS §6): a Wan block over the VACE context's tokens, whose output projected by
    `after_proj` is a hint for one main block; the first one also adds `before_proj` of its input to the noisy
    latent's tokens before the main blocks run. Both projections start at zero, so an untrained VACE branch
    changes nothing."""

    def __init__(self, config: DiTConfig, first: bool):
        super().__init__(config)
        if first:
            self.before_proj = ops.Linear(config.dim, config.dim)
        self.after_proj = ops.Linear(config.dim, config.dim)


class ImageEmbedding(nn.Module):
    """CLIP image tokens [B, N, image_dim] -> [B, N, dim] for the cross-attention (`img_emb`): LayerNorm, Linear,
    GELU, Linear, LayerNorm; FLF2V first adds learned positions (`emb_pos`, its two images' 514 tokens)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        width = config.image_dim
        self.proj = nn.Sequential(LayerNorm(width, 1e-5), ops.Linear(width, width), nn.GELU(),
                                  ops.Linear(width, config.dim), LayerNorm(config.dim, 1e-5))
        if config.image_positions:
            self.emb_pos = nn.Parameter(torch.zeros(1, config.image_positions, width))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            if image.shape[1] > self.emb_pos.shape[1]:
                raise InputError(f"{image.shape[1]} image tokens, but this model has positions for "
                                 f"{self.emb_pos.shape[1]}")
            image = image.float() + ops.patched(self, "emb_pos")[:, :image.shape[1]]
        return self.proj(image).float()


class Head(nn.Module):
    """Final norm with a 2-way shift/scale modulation from the raw time embedding, then a Linear to patches."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)
        self.head = ops.Linear(config.dim, config.out_dim * math.prod(config.patch_size))

    def forward(self, x: torch.Tensor, e: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], e [U, dim] -> [B, L, prod(patch_size)·out_dim] float32."""
        mod = ops.patched(self, "modulation") + e[:, None]  # [U, 2, dim]
        shift, scale = mod[:, 0][t_index], mod[:, 1][t_index]
        return self.head(torch.addcmul(shift, _layer_norm(x, self.eps), 1 + scale)).float()


# ------------------------------------------------------------------------------------------------------------------
# Working memory
# ------------------------------------------------------------------------------------------------------------------

def dit_activation_bytes(config: DiTConfig, *, batch: int, tokens: int, compute_dtype: torch.dtype,
                         per_token_timesteps: bool, attention_workspace: int = 0) -> int:
    """Peak bytes of the tensors one WanDiT forward keeps alive besides its weights (and the per-call weight
    upcast of `sora.ops.weight_workspace_bytes`).

    Derivation, following `WanBlock.forward` in inference (no autograd graph). Per token of the batch, with
    D = dim, F = ffn_dim, c = bytes per element of the compute dtype and float32 residuals (4 bytes):
      self-attention: the block input x, the modulated norm h (4D each); q, k, v in c (3cD); while RoPE rotates k,
        its float32 copy and the complex product (8D)                                              -> (16 + 3c)·D
        (during attention itself: x, h, q, k, v and the output: (8 + 5c)·D, plus the kernel's workspace,
        `attention_workspace` bytes for the whole batch: `sora.attention.workspace_bytes`)
      feed-forward: the block input held by the caller, the new residual x, h (12D), the hidden layer and its GELU
        (2cF)                                                                                      -> 12D + 2cF
        projecting back: 12D, the GELU output (cF), the projection (cD), its float32 copy and the new x (8D)
                                                                                                   -> 20D + cF + cD
      per-token timesteps (timestep [B, L]): shift, scale and gate become [B, L, D] float32        -> + 12D
      the RoPE table (complex64, head_dim/2 per token) and the caller's float32 latent             -> + 4·head_dim
                                                                                                      + 4·in_dim·patch
    Per sample: the embedded text context and the cross-attention keys and values, text_len·D·(4 + 4c) at most.
    Not included: the attention kernel's own workspace (flash / memory-efficient kernels need O(tokens); the math
    fallback would need batch·heads·tokens² more), beyond `attention_workspace`.
    `tests/test_memory_streaming.py` checks the estimate against the tensors actually alive during a forward.
    """
    D, F, c = config.dim, config.ffn_dim, torch.empty(0, dtype=compute_dtype).element_size()
    blocks = max(batch * tokens * max((16 + 3 * c) * D, 12 * D + 2 * c * F, 20 * D + c * F + c * D),
                 batch * tokens * (8 + 5 * c) * D + attention_workspace)
    per_token = (12 * D if per_token_timesteps else 0) + 4 * config.head_dim + 4 * config.in_dim * math.prod(
        config.patch_size)
    per_sample = config.text_len * D * (4 + 4 * c)
    return blocks + batch * (tokens * per_token + per_sample)


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------

class WanDiT(nn.Module):
    """The Wan 2.1 / 2.2 text-to-video diffusion transformer.

    `forward(x, timestep, context)` returns the velocity. Build with a `DiTConfig`, or load a file with `load_dit`.
    """

    # These stay float32 whatever the compute dtype (`set_compute`); the blocks repeat, so the memory manager can
    # stream them.
    _keep_in_fp32_modules = ("time_embedding", "time_projection", "head")
    _repeated_blocks = ("WanBlock",)

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(ops.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            ops.Linear(dim, dim))
        self.time_embedding = nn.Sequential(ops.Linear(config.freq_dim, dim), nn.SiLU(), ops.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        if config.image_dim is not None:
            self.img_emb = ImageEmbedding(config)
        if config.vace_layers:
            self.vace_patch_embedding = nn.Conv3d(config.vace_in_dim, dim, config.patch_size, stride=config.patch_size)
            self.vace_blocks = nn.ModuleList(VaceBlock(config, first=i == 0) for i in range(len(config.vace_layers)))
        self.compute_dtype = torch.float32
        self.attention_backend = "sdpa"
        self.set_compute(dtype=torch.float32)
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference initialisation (Wan `init_weights`): Xavier-uniform Linears and patch embedding, zero
        biases, N(0, 0.02) text and time embeddings, a zero head so that a fresh model predicts v = 0."""
        if self.patch_embedding.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding.modules(), *self.time_embedding.modules()):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in getattr(self, "vace_blocks", ()):  # a fresh VACE branch adds nothing (Wan's zero init)
            for projection in (getattr(block, "before_proj", None), block.after_proj):
                if projection is not None:
                    nn.init.zeros_(projection.weight)

    def set_compute(self, *, dtype: torch.dtype | None = None, attention: str | None = None) -> None:
        """Choose the matmul dtype (float32, bfloat16, float16) and the attention backend; None keeps the current.

        The time embedding, modulation, norms, residual stream and head stay float32 (reference precision policy).
        """
        if dtype is not None:
            if dtype not in COMPUTE_DTYPES:
                raise InputError(f"compute dtype {dtype} is not supported; use one of {COMPUTE_DTYPES}")
            ops.set_compute_dtype(self, dtype)
            for name in self._keep_in_fp32_modules:
                ops.set_compute_dtype(self.get_submodule(name), torch.float32)
            self.compute_dtype = dtype
        if attention is not None:
            check_backend(attention)
            for m in self.modules():
                if isinstance(m, Attention):
                    m.backend = attention
            self.attention_backend = attention

    def activation_bytes(self, args: tuple, kwargs: dict) -> int:
        """Working memory of the call `self(*args, **kwargs)` besides the resident weights: the tensors of
        `dit_activation_bytes` (with the attention backend's workspace: the "matmul" backend's chunk of scores)
        plus the largest per-call weight upcast. The memory manager plans each call with it."""
        x = args[0] if args else kwargs["x"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        samples = list(x) if isinstance(x, (list, tuple)) else list(x.unbind(0)) if x.ndim == 5 else [x]
        patch = math.prod(self.config.patch_size)
        tokens = max(s[0].numel() // patch for s in samples)  # per sample: T·H·W / patch
        per_token = torch.as_tensor(timestep).ndim == 2
        kernel = attention_workspace_bytes(self.attention_backend, batch=len(samples), queries=tokens, keys=tokens,
                                           heads=self.config.num_heads, head_dim=self.config.head_dim,
                                           dtype=self.compute_dtype)
        return (dit_activation_bytes(self.config, batch=len(samples), tokens=tokens, compute_dtype=self.compute_dtype,
                                     per_token_timesteps=per_token, attention_workspace=kernel)
                + ops.weight_workspace_bytes(self))

    def forward(self, x: torch.Tensor | list[torch.Tensor], timestep: torch.Tensor, context: torch.Tensor, *,
                image: torch.Tensor | None = None, vace: Sequence[tuple[torch.Tensor, float]] = (),
                blocks: BlockStack | None = None, sequence: TokenShard | None = None
                ) -> torch.Tensor | list[torch.Tensor]:
        """Velocity v = noise - x0 for a batch of normalised latents.

        x: [B, in_dim, T, H, W], or a list of B latents [in_dim, T_i, H_i, W_i] of different sizes (they are run
           as one padded batch whose padding keys are masked); each size divisible by `patch_size`.
        timestep: σ·1000 as float, shaped [B] (per sample), [B, T] (per latent frame) or [B, L] (per token;
           L = tokens of the patch grid, the longest sample's for a list).
        context: [B, L_txt, text_dim] text states with L_txt <= text_len; zero-padded to text_len here and attended
           to without a key mask, as the model was trained.
        image: CLIP image tokens [B, N, image_dim] (penultimate ViT-H/14 states, 257 per image) for a model with an
           image branch (Wan 2.1 I2V / FLF2V); required there, refused elsewhere.
        vace: VACE contexts [B, vace_in_dim, T, H, W] with their strengths, for a model with a VACE branch; their
           hints are summed.
        blocks: runs the block stack instead of the plain loop, as `blocks(run, tokens, e, e0)` with `run(tokens)`
           the loop itself and e [U, dim], e0 [U, 6, dim] the time embeddings (a step cache plugs in here).
        sequence: this process's share of the tokens (sequence parallelism, `sora.parallel`): the blocks and the
           head run on it, self-attention through `sequence.attend`, and the output is gathered once at the end.
        Returns float32 [B, out_dim, T, H, W] (a list of [out_dim, T_i, H_i, W_i] for list input).
        """
        samples = list(x) if isinstance(x, (list, tuple)) else None
        if samples is None:
            if x.ndim != 5:
                raise InputError(f"x must be [B, C, T, H, W] or a list of [C, T, H, W]; got shape {list(x.shape)}")
            tokens, grid = self._embed_patches(x)  # [B, L, dim]
            grids = [grid] * x.shape[0]
            rotations = rope_table(grid, self.config.head_dim, max_len=self.config.rope_max_len,
                                   device=x.device)[None]  # [1, L, head_dim/2]
            token_counts = None
            device = x.device
        else:
            if not samples:
                raise InputError("x is an empty list")
            tokens, grids, rotations, token_counts = self._embed_list(samples)
            device = samples[0].device
        B, L, _ = tokens.shape

        t_tokens = _token_timesteps(torch.as_tensor(timestep, device=device), grids, L)  # [B, 1 or L]
        t_values, t_index = torch.unique(t_tokens, return_inverse=True)  # [U], [B, 1 or L]
        e = self.time_embedding(sinusoidal_embedding(t_values, self.config.freq_dim)).float()  # [U, dim]
        e0 = self.time_projection(e).float().unflatten(1, (6, -1))  # [U, 6, dim]

        context, context_counts = self._embed_context(context.to(device), B)  # [B, S, dim], [B, S]
        image_tokens = self._embed_image(image, B, device)  # [B, N, dim] or None
        hints = self._vace_hints(vace, samples, x, tokens, B)  # VACE context tokens, strengths
        attend = None
        if sequence is not None:  # from here on this process holds its share of the tokens: [B, L_local, ...]
            token_counts = sequence.key_counts(token_counts, tokens)  # the keys are the whole padded sequence
            tokens, hints = sequence.local(tokens), [(sequence.local(c), s) for c, s in hints]
            rotations = sequence.local(rotations, fill=1.0)  # padding is never rotated
            t_index = sequence.local(t_index) if t_index.shape[1] == L else t_index
            attend = sequence.attend

        def run(tokens: torch.Tensor) -> torch.Tensor:
            state = [c for c, _ in hints]  # VACE: each context's current tokens, run beside the main blocks
            embedded = tokens if hints else None  # VACE: the noisy latent's tokens before any block
            for i, block in enumerate(self.blocks):
                args = (context, context_counts, e0, t_index, rotations, token_counts, image_tokens)
                tokens = block(tokens, *args, attend=attend)
                if i in self._vace_index:
                    vace_block = self.vace_blocks[self._vace_index[i]]
                    for n, (_, strength) in enumerate(hints):
                        if self._vace_index[i] == 0:  # the first VACE block starts from the noisy latent's tokens
                            state[n] = vace_block.before_proj(state[n]).float() + embedded
                        state[n] = vace_block(state[n], *args, attend=attend)
                        tokens = tokens + vace_block.after_proj(state[n]).float() * strength
            return tokens

        given = [tokens]  # handed over, not kept here: the loop frees each block's input as the plain loop did
        del tokens
        tokens = run(given.pop()) if blocks is None else blocks(run, given.pop(), e, e0)
        out = self.head(tokens, e, t_index)  # [B, L, prod(patch)·out_dim]
        if sequence is not None:
            out = sequence.gather(out, L)  # [B, L_local, ...] of every process -> [B, L, ...]
        if samples is None:
            return self._unpatchify(out, grids[0])
        return [self._unpatchify(out[i:i + 1, :math.prod(g)], g)[0] for i, g in enumerate(grids)]

    # -- forward helpers -------------------------------------------------------------------------------------------

    def _embed_patches(self, x: torch.Tensor, conv: nn.Conv3d | None = None
                       ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, T, H, W] -> tokens [B, L, dim] float32 in row-major (f, h, w) order, and the patch grid, through
        `conv` (the patch embedding, or the VACE one).

        The Conv3d's kernel equals its stride, so it is one matmul over flattened patches; flattening in the
        weight's (C, pt, ph, pw) order gives the tokens contiguous, with no transpose after the conv.
        """
        conv = self.patch_embedding if conv is None else conv
        B, C, T, H, W = x.shape
        pt, ph, pw = self.config.patch_size
        if C != conv.in_channels:
            raise InputError(f"the model takes {conv.in_channels} latent channels, got {C}")
        if T % pt or H % ph or W % pw:
            raise InputError(f"latent size (T, H, W) = {(T, H, W)} must be divisible by the patch {(pt, ph, pw)}")
        grid = (T // pt, H // ph, W // pw)
        patches = rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        dtype = self.compute_dtype
        weight = ops.patched(conv, "weight", dtype).flatten(1)  # [dim, C·pt·ph·pw]
        tokens = F.linear(patches.to(dtype), weight, ops.patched(conv, "bias", dtype))
        return tokens.float(), grid

    @property
    def _vace_index(self) -> dict[int, int]:
        """Main block -> the VACE block whose hint it takes."""
        return {layer: n for n, layer in enumerate(self.config.vace_layers)}

    def _embed_image(self, image: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        cfg = self.config
        if cfg.image_dim is None:
            if image is not None:
                raise InputError("this model has no image branch (no img_emb); it takes no CLIP image tokens")
            return None
        if image is None:
            raise InputError("this Wan 2.1 image-to-video model reads CLIP image tokens: give the start image's "
                             "(Sora CLIP Vision Encode, through Sora Wan Image To Video's clip_vision input)")
        if image.ndim != 3 or image.shape[0] not in (1, batch) or image.shape[2] != cfg.image_dim:
            raise InputError(f"image tokens must be [{batch}, N, {cfg.image_dim}] (CLIP ViT-H/14 states), got "
                             f"{list(image.shape)}")
        return self.img_emb(image.to(device).expand(batch, -1, -1))

    def _vace_hints(self, vace, samples, x, tokens: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, float]]:
        """Each VACE context's patch tokens [B, L, dim] and strength (the first VACE block adds the noisy tokens)."""
        if not self.config.vace_layers:
            if vace:
                raise InputError("this model has no VACE branch (no vace_blocks); it takes no VACE context")
            return []
        if samples is not None:
            raise InputError("a VACE model takes one latent size per batch (a tensor, not a list)")
        hints = []
        for context, strength in vace:
            if context.ndim != 5 or context.shape[1] != self.config.vace_in_dim or context.shape[2:] != x.shape[2:] \
                    or context.shape[0] not in (1, batch):
                raise InputError(f"a VACE context must be [{batch}, {self.config.vace_in_dim}, "
                                 f"{', '.join(map(str, x.shape[2:]))}] like the latent, got {list(context.shape)}")
            c, _ = self._embed_patches(context.to(x.device).expand(batch, -1, -1, -1, -1), self.vace_patch_embedding)
            hints.append((c, float(strength)))
        return hints

    def _embed_list(self, samples: list[torch.Tensor]):
        """Embed latents of different sizes and right-pad them to the longest; padding is never rotated."""
        embedded, grids, tables = [], [], []
        for sample in samples:
            if sample.ndim != 4:
                raise InputError(f"each latent of a list must be [C, T, H, W]; got shape {list(sample.shape)}")
            tokens, grid = self._embed_patches(sample[None])
            embedded.append(tokens[0])
            grids.append(grid)
            tables.append(rope_table(grid, self.config.head_dim, max_len=self.config.rope_max_len,
                                     device=tokens.device))
        lengths = torch.tensor([t.shape[0] for t in embedded], device=embedded[0].device)
        L = int(lengths.max())
        tokens = torch.stack([F.pad(t, (0, 0, 0, L - t.shape[0])) for t in embedded])  # [B, L, dim]
        rotations = torch.stack([F.pad(r, (0, 0, 0, L - r.shape[0]), value=1.0) for r in tables])  # [B, L, d/2]
        counts = (torch.arange(L, device=lengths.device)[None] < lengths[:, None]).long()  # [B, L]
        return tokens, grids, rotations, counts

    def _embed_context(self, context: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text rows [B, L_txt, text_dim] -> embedded rows [B, S, dim] and their multiplicities [B, S].

        The model attends to the context zero-padded to text_len rows, with no key mask. All zero rows embed to
        the same key and value, so instead of embedding and attending to up to text_len copies, the real rows
        are followed by a single zero row that counts for all of them (exact: softmax over n equal keys is one
        key with its logit raised by log n). Trailing zero rows of the input are padding of the same kind.
        """
        cfg = self.config
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
            raise InputError(f"context must be [{batch}, L, {cfg.text_dim}] (batch, tokens, text width); "
                             f"got {list(context.shape)}")
        L = context.shape[1]
        if L > cfg.text_len:
            raise InputError(f"context has {L} tokens; this model takes at most {cfg.text_len}")
        positions = torch.arange(1, L + 1, device=context.device)
        real = ((context != 0).any(-1) * positions).amax(-1) if L else positions.new_zeros(batch)  # [B] rows
        padding = cfg.text_len - real  # [B] zero rows of the padded context
        if not padding.any():
            return self.text_embedding(context), None
        S = int(real.max())
        rows = F.pad(context[:, :S], (0, 0, 0, 1))  # [B, S + 1, text_dim], the last row zero
        counts = (positions[None, :S] <= real[:, None]).long()  # 1 for real rows, 0 for a shorter sample's zeros
        counts = torch.cat([counts, padding[:, None]], dim=1)  # [B, S + 1]
        return self.text_embedding(rows), counts

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt·ph·pw·C] with C fastest -> [B, C, T, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        return rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)


def _token_timesteps(timestep: torch.Tensor, grids: list[tuple[int, int, int]], length: int) -> torch.Tensor:
    """Timesteps per sample [B], per latent frame [B, T] or per token [B, L] -> [B, 1] or [B, length] float."""
    B = len(grids)
    t = timestep.float()
    if t.ndim == 0:
        return t.expand(B, 1)
    if t.shape[0] != B or t.ndim > 2:
        raise InputError(f"timestep must be [B], [B, T] or [B, L] with B = {B}; got {list(t.shape)}")
    if t.ndim == 1:
        return t[:, None]
    if t.shape[1] == length:
        return t
    if all(g[0] == t.shape[1] for g in grids):
        per_token = [t[i].repeat_interleave(g[1] * g[2]) for i, g in enumerate(grids)]  # frame-major token order
        return torch.stack([F.pad(p, (0, length - p.shape[0])) for p in per_token])
    frames = sorted({g[0] for g in grids})
    raise InputError(f"timestep has {t.shape[1]} values per sample; expected 1, the latent frames ({frames}) "
                     f"or the tokens ({length})")


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
ANCHOR = "head.modulation"  # every Wan DiT file has it
DIFFUSERS_ANCHOR = "condition_embedder.time_proj.weight"

# diffusers `WanTransformer3DModel` -> original names; applied to module paths (the last key part is kept) or to
# whole parameter names. Note the norm swap: diffusers' norm2 is the affine pre-cross-attention norm3.
DIFFUSERS_TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
    "patch_embedding": "patch_embedding",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "vace_patch_embedding": "vace_patch_embedding",
    "scaled_fp8": "scaled_fp8",
}
DIFFUSERS_BLOCK = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "proj_in": "before_proj",  # VACE blocks
    "proj_out": "after_proj",
}
_BLOCK_KEY = re.compile(r"((?:vace_)?blocks\.\d+\.)(.+)")


def convert_diffusers(state_dict: StateDict) -> StateDict:
    """Rename a diffusers-layout Wan transformer state dict to the original layout (tensors are not copied)."""
    converted = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        prefix, rest, table = (match[1], match[2], DIFFUSERS_BLOCK) if match else ("", key, DIFFUSERS_TOP_LEVEL)
        module, _, leaf = rest.rpartition(".")
        if rest in table:
            new = table[rest]
        elif module in table:
            new = f"{table[module]}.{leaf}"
        elif rest.endswith("norm_added_q.weight"):  # an unused tensor some diffusers files carry
            continue
        else:
            raise CheckpointError(f"unknown tensor {key!r} in a diffusers-layout Wan transformer")
        converted[prefix + new] = value
    return converted


# Wan families whose extra tensors this model does not have: (key fragment, what it is).
_UNSUPPORTED_WAN = (
    ("audio_", "Wan 2.2 speech-to-video (S2V)"),
    ("casual_audio_encoder", "Wan 2.2 speech-to-video (S2V)"),
)

# safetensors metadata a file may carry (our own files: the nano model); values are strings.
_METADATA_FIELDS = {"model_type": str, "num_heads": int, "text_len": int, "eps": float, "rope_max_len": int,
                    "latent_format": str, "per_token_timesteps": lambda s: s.lower() in ("1", "true", "yes")}
FAMILIES = ("wan", "nano")


def detect_config(state_dict: StateDict, metadata: dict[str, str] | None = None) -> DiTConfig:
    """Read the model shape from tensor names and shapes (original key layout), and `sora.*` metadata if any.

    Metadata: `sora.family` ('wan' by default, or 'nano' for the embedded model: latent format 'nano', per-token
    timesteps) and optional `sora.<field>` overrides for model_type, num_heads, text_len, eps, rope_max_len,
    latent_format, per_token_timesteps. Without `sora.num_heads`, heads have 128 channels as in every Wan release.
    """
    sd = state_dict
    metadata = metadata or {}
    if ANCHOR not in sd:
        raise CheckpointError(f"this is not a Wan DiT: {describe(sd, 'Wan DiT')}")
    for fragment, family in _UNSUPPORTED_WAN:
        if any(fragment in key for key in sd):
            raise CheckpointError(f"this is a {family} checkpoint, which is not supported yet; use a Wan 2.1 / "
                                  "2.2 text-to-video, TI2V-5B, image-to-video, FLF2V or VACE file")
    family = metadata.get("sora.family", "wan")
    if family not in FAMILIES:
        raise CheckpointError(f"sora.family {family!r} in the file's metadata is not one of {FAMILIES}")
    for key in ("patch_embedding.weight", "head.head.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                "blocks.0.ffn.0.weight"):
        if key not in sd:
            raise CheckpointError(f"the Wan DiT file lacks {key!r}; it is incomplete or of another model")

    dim = sd[ANCHOR].shape[-1]
    patch = tuple(sd["patch_embedding.weight"].shape[2:])
    in_dim = sd["patch_embedding.weight"].shape[1]
    out_dim = sd["head.head.weight"].shape[0] // math.prod(patch)
    values = dict(in_dim=in_dim, out_dim=out_dim, dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
                  num_layers=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                  text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
                  patch_size=patch)
    if family == "nano":
        values.update(model_type="t2v", latent_format="nano", per_token_timesteps=True)
    elif in_dim == out_dim == 48:
        values.update(model_type="ti2v", latent_format="wan22", per_token_timesteps=True)
    elif in_dim == out_dim == 16:
        values.update(model_type="t2v", latent_format="wan21", per_token_timesteps=False)
    elif (in_dim, out_dim) == (36, 16):
        values.update(model_type="i2v", latent_format="wan21", per_token_timesteps=False)
    else:
        raise CheckpointError(f"unknown Wan variant: {in_dim} input and {out_dim} output latent channels "
                              "(known: 16/16 text-to-video and VACE, 48/48 TI2V-5B, 36/16 image-to-video)")
    if "img_emb.proj.0.weight" in sd:  # Wan 2.1 I2V / FLF2V: CLIP image tokens through their own keys and values
        values["image_dim"] = sd["img_emb.proj.0.weight"].shape[0]
        if "img_emb.emb_pos" in sd:
            values.update(model_type="flf2v", image_positions=sd["img_emb.emb_pos"].shape[1])
    vace = len({k.split(".")[1] for k in sd if k.startswith("vace_blocks.")})
    if vace:  # VACE: n hint blocks spread evenly over the main blocks (ECOSYSTEM_FACTS §6)
        if "vace_patch_embedding.weight" not in sd or values["num_layers"] % vace:
            raise CheckpointError(f"a VACE file with {vace} VACE blocks for {values['num_layers']} blocks, or without "
                                  "vace_patch_embedding, is incomplete or of another model")
        step = values["num_layers"] // vace
        values.update(vace_layers=tuple(range(0, values["num_layers"], step)),
                      vace_in_dim=sd["vace_patch_embedding.weight"].shape[1])
    for name, parse in _METADATA_FIELDS.items():
        if f"sora.{name}" in metadata:
            values[name] = parse(metadata[f"sora.{name}"])
    if "num_heads" not in values:
        if dim % 128:
            raise CheckpointError(f"width {dim} is not a multiple of 128, so the head count cannot be inferred; "
                                  "write it in the file's metadata as sora.num_heads")
        values["num_heads"] = dim // 128
    return DiTConfig(**values)


def to_original_layout(state_dict: StateDict) -> StateDict:
    """Any supported layout (original, prefixed, diffusers) -> original Wan key names."""
    sd = strip_prefix(state_dict, PREFIXES, ANCHOR)
    if ANCHOR in sd:
        return sd
    sd = strip_prefix(state_dict, PREFIXES, DIFFUSERS_ANCHOR)
    if DIFFUSERS_ANCHOR in sd:
        return convert_diffusers(sd)
    return sd


def load_dit(path: str | Path, *, weight_dtype: torch.dtype | None = None,
             compute_dtype: torch.dtype = torch.bfloat16, attention: str = "sdpa",
             device: torch.device | str = "cpu") -> WanDiT:
    """Load a Wan DiT file into a `WanDiT` in eval mode, its shape detected from the tensors.

    path: safetensors file, sharded `*.index.json` (or its folder), `.pth` (read with weights_only=True) or a GGUF
      file in city96's layout; original, ComfyUI-prefixed or diffusers key layout; fp8 and ComfyUI "scaled fp8"
      weights stay in fp8, GGUF weights stay quantised (dequantised per layer and call).
    weight_dtype: store the Linear weights in this dtype (None: as in the file).
    compute_dtype: matmul dtype (float32, bfloat16, float16); attention: a backend of `sora.attention`.
    The model is built on the meta device and the file's tensors are assigned into it, so loading needs about
    the weights' size in memory.
    """
    check_backend(attention)
    metadata = read_metadata(path)
    architecture = metadata.get("general.architecture", "wan").lower()
    if architecture not in ("wan", "pig", "cow"):  # city96's early converters wrote a placeholder
        raise CheckpointError(f"{path}: this GGUF holds a {architecture!r} model (general.architecture), not a Wan "
                              "DiT; pick a Wan GGUF such as city96's wan2.1-t2v-14b-Q4_K_M.gguf")
    state_dict = to_original_layout(load_state_dict(path))
    try:
        config = detect_config(state_dict, metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build(lambda: WanDiT(config), state_dict, what="Wan DiT", source=path, weight_dtype=weight_dtype)
    model.to(device)
    model.set_compute(dtype=compute_dtype, attention=attention)
    model.loaded_from = (Path(path), weight_dtype)  # another process loads its own copy from it (sora.parallel)
    return model.eval().requires_grad_(False)

