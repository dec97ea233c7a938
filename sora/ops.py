"""Layers that keep weights in their stored dtype and compute in a chosen one.

Video DiT files come in bf16, fp16, fp8 (`float8_e4m3fn`, `float8_e5m2`) and ComfyUI's "scaled fp8", where each
quantised Linear has a float32 scalar `scale_weight` and the real weight is `weight.to(dtype) * scale_weight`.
`Linear` keeps such weights as they are stored (fp8 stays one byte per weight in memory) and upcasts them per
call, so the matmul runs in `compute_dtype`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear with stored-dtype weights, an optional fp8 `scale_weight`, and a settable compute dtype.

    `compute_dtype=None` computes in the input's dtype. The output has the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.compute_dtype: torch.dtype | None = None
        self.register_buffer("scale_weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        weight = self.weight.to(dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), weight, bias)


def set_compute_dtype(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Set the matmul dtype of every `Linear` in `module` (None: follow the input)."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.compute_dtype = dtype


def cast_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Store the weights of every `Linear` in `dtype` (the loaders' "weight dtype" option).

    Casting to fp8 is a plain cast, like ComfyUI's `fp8_e4m3fn` option; an existing `scale_weight` is folded in
    first so that no information about the scale is lost.
    """
    for m in module.modules():
        if isinstance(m, Linear):
            weight = m.weight.data
            if m.scale_weight is not None:
                weight = weight.float() * m.scale_weight.float()
                m.scale_weight = None
            m.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
