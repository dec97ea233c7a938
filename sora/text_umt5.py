"""The umT5 encoder stack that Wan reads prompts with (umT5-XXL, encoder only), and its checkpoint layouts.

Written from the architecture facts (T5 v1.1 with one relative position bias table per layer): pre-norm RMS
norms, attention without 1/sqrt(d) scaling, a gated tanh-GELU feed-forward, no biases. Module attributes carry the
HF / ComfyUI key names (`encoder.block.N.layer.0.SelfAttention.q.weight`, ...), so those files load by name; the
original Wan `.pth` names are converted by a flat rename table. Linear layers are `ops.Linear`, so fp8 and scaled
fp8 weights stay one byte per weight and are upcast per call.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checkpoints import StateDict
from .errors import CheckpointError


@dataclass(frozen=True)
class UMT5Config:
    """Encoder shape; the defaults are umT5-XXL as Wan ships it."""
    vocab_size: int = 256384
    d_model: int = 4096
    num_heads: int = 64
    d_kv: int = 64  # per head; heads * d_kv is the attention width (4096 for XXL)
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32  # relative position buckets, half of them for keys after the query
    max_distance: int = 128  # not stored in files; every umT5 uses 128
    eps: float = 1e-6

    @classmethod
    def from_state_dict(cls, state_dict: StateDict) -> UMT5Config:
        """Read the shape from HF-named tensors (see `ORIGINAL_TO_HF` for the other layout)."""
        vocab_size, d_model = state_dict["shared.weight"].shape
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
        if not blocks or blocks != set(range(len(blocks))):
            raise CheckpointError(f"the umT5 blocks in this file are not numbered 0..N-1 (found {sorted(blocks)})")
        bias_key = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
        if len(blocks) > 1 and bias_key.format(1) not in state_dict:
            raise CheckpointError("this is a T5 v1.1 encoder (one position bias shared by all layers, as in the "
                                  "t5xxl files of Flux / SD3), not umT5; Wan needs umt5_xxl_*.safetensors")
        num_buckets, num_heads = state_dict[bias_key.format(0)].shape
        inner = state_dict["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        d_ff = state_dict["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
        return cls(vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, d_kv=inner // num_heads,
                   d_ff=d_ff, num_layers=len(blocks), num_buckets=num_buckets)


UMT5_XXL = UMT5Config()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layouts
# ---------------------------------------------------------------------------------------------------------------

# Original Wan `.pth` name -> HF / ComfyUI name; `{n}` is the block index.
ORIGINAL_TO_HF = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
    "blocks.{n}.norm1.weight": "encoder.block.{n}.layer.0.layer_norm.weight",
    "blocks.{n}.attn.q.weight": "encoder.block.{n}.layer.0.SelfAttention.q.weight",
    "blocks.{n}.attn.k.weight": "encoder.block.{n}.layer.0.SelfAttention.k.weight",
    "blocks.{n}.attn.v.weight": "encoder.block.{n}.layer.0.SelfAttention.v.weight",
    "blocks.{n}.attn.o.weight": "encoder.block.{n}.layer.0.SelfAttention.o.weight",
    "blocks.{n}.pos_embedding.embedding.weight":
        "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight",
    "blocks.{n}.norm2.weight": "encoder.block.{n}.layer.1.layer_norm.weight",
    "blocks.{n}.ffn.gate.0.weight": "encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "blocks.{n}.ffn.fc1.weight": "encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "blocks.{n}.ffn.fc2.weight": "encoder.block.{n}.layer.1.DenseReluDense.wo.weight",
}


def original_to_hf(state_dict: StateDict) -> StateDict:
    """Rename an original-layout (`models_t5_umt5-xxl-enc-bf16.pth`) state dict to HF names; shapes are equal."""
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"blocks\.(\d+)\.(.+)", key)
        template = f"blocks.{{n}}.{match.group(2)}" if match else key
        if template not in ORIGINAL_TO_HF:
            raise CheckpointError(f"unexpected tensor {key!r} in an original-layout umT5 file")
        out[ORIGINAL_TO_HF[template].format(n=match.group(1) if match else "")] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------

def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of `key_pos - query_pos`: the upper half of the buckets is for keys after the query;
    within a half, distances below a quarter of the buckets are exact, larger ones log-spaced up to max_distance."""
    half = num_buckets // 2
    exact = half // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    # clamp(min=1) only keeps log() finite for the exact positions, whose value torch.where discards
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_ratio.long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square (statistic in fp32), no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x32.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q = ops.Linear(cfg.d_model, inner, bias=False)
        self.k = ops.Linear(cfg.d_model, inner, bias=False)
        self.v = ops.Linear(cfg.d_model, inner, bias=False)
        self.o = ops.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)
        self.num_heads = cfg.num_heads
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance

    def position_bias(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, heads, L, L] additive bias from this layer's own table."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias.weight[buckets].to(dtype).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], key_mask [B, L] bool (True = real token) -> [B, L, D]."""
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        bias = self.position_bias(L, q.dtype).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(d) scaling
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class AttentionLayer(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.SelfAttention = SelfAttention(cfg)


class GatedFeedForward(nn.Module):
    """out = wo(wi_1(x) * gelu_tanh(wi_0(x)))."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.wi_0 = ops.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = ops.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = ops.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.wi_1(x) * F.gelu(self.wi_0(x), approximate="tanh"))


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.DenseReluDense = GatedFeedForward(cfg)


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg), FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        attn, ffn = self.layer
        x = _clamp_fp16(x + attn.SelfAttention(attn.layer_norm(x), key_mask))
        return _clamp_fp16(x + ffn.DenseReluDense(ffn.layer_norm(x)))


class Stack(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class UMT5Encoder(nn.Module):
    """umT5 encoder: token ids -> per-token states, computed in `compute_dtype` (float32 unless set)."""
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)
        self.compute_dtype = torch.float32

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        ops.set_compute_dtype(self, dtype)

    def forward(self, ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """ids [B, L] int64, key_mask [B, L] bool -> [B, L, d_model] in the compute dtype.

        Rows of padding positions hold values (they attend like any query); callers zero them.
        """
        x = self.shared.weight[ids].to(self.compute_dtype)  # indexing, not F.embedding: works for fp8 tables
        for block in self.encoder.block:
            x = block(x, key_mask)
        return self.encoder.final_layer_norm(x)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """umT5 activations overflow fp16 in a few channels; clamping keeps them finite (the reference does the same)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)
