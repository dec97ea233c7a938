"""Layers that keep weights in their stored dtype and compute in a chosen one, and the weight patches of a call.

Video DiT files come in bf16, fp16, fp8 (`float8_e4m3fn`, `float8_e5m2`) and ComfyUI's "scaled fp8", where each
quantised Linear has a float32 scalar `scale_weight` and the real weight is `weight.to(dtype) * scale_weight`.
`Linear` keeps such weights as they are stored (fp8 stays one byte per weight in memory) and upcasts them per
call, so the matmul runs in `compute_dtype`.

Weight patches (LoRAs, full deltas) never change a stored weight: a model handle installs them on the modules they
touch for the duration of one forward (`installed`), and the layers add them as they compute. A `Linear` adds a
low-rank patch to this call's weight (`W + up·down`, a temporary like the upcast) or, for a few tokens, on the
activations (`x·downᵀ·upᵀ`), whichever costs less, and any other patch to the weight; other parameters (norms,
modulation, the patch embedding) read themselves through `patched`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import gguf

PATCHES = "sora_patches"  # module attribute: {parameter name: (BoundPatch, ...)} while a patched forward runs


@dataclass(frozen=True)
class BoundPatch:
    """A patch of one parameter at a strength.

    delta: an object with `delta(strength, dtype) -> Tensor` (the full-size change of the parameter); when it also
        has 2-D `down`, `up` and a `scale` (a low-rank patch without a mid matrix), `Linear` applies it on the
        activations. Its factors are copied to a compute device once and kept (`factors`).
    """
    delta: object
    strength: float
    _copies: dict = field(default_factory=dict, compare=False, repr=False)  # (device, dtype) -> (down, up)

    @property
    def low_rank(self) -> bool:
        d = self.delta
        return all(hasattr(d, a) for a in ("down", "up", "scale")) and getattr(d, "mid", None) is None \
            and d.down.ndim == 2

    def full(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        return self.delta.delta(self.strength, dtype).to(device)

    def factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of a low-rank patch on `device` in `dtype`, up scaled by strength · alpha / rank."""
        key = (device, dtype)
        if key not in self._copies:
            d = self.delta
            self._copies[key] = (d.down.to(device, dtype), (d.up.float() * (self.strength * d.scale)).to(device, dtype))
        return self._copies[key]


def patches_of(module: nn.Module, name: str) -> Sequence[BoundPatch]:
    table = module.__dict__.get(PATCHES)
    return table.get(name, ()) if table else ()


def patched(module: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`module.<name>` in `dtype` with the patches installed on it added (the tensor itself when there are none)."""
    value = getattr(module, name).to(dtype)
    for patch in patches_of(module, name):
        value = value + patch.full(dtype, value.device).reshape(value.shape)
    return value


@contextlib.contextmanager
def installed(model: nn.Module, table: Mapping[str, Mapping[str, Sequence[BoundPatch]]]) -> Iterator[None]:
    """Install {module path: {parameter name: patches}} on `model`'s modules for the `with` block."""
    modules = [model.get_submodule(path) for path in table]
    try:
        for module, params in zip(modules, table.values()):
            module.__dict__[PATCHES] = params
        yield
    finally:
        for module in modules:
            module.__dict__.pop(PATCHES, None)


class Linear(nn.Linear):
    """nn.Linear with stored-dtype weights, an optional fp8 `scale_weight`, a settable compute dtype and the
    patches installed on it.

    `compute_dtype=None` computes in the input's dtype. The output has the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.compute_dtype: torch.dtype | None = None
        self.gguf_type: int | None = None  # a GGUF type id when `weight` holds quantised blocks (`quantize`)
        self.register_buffer("scale_weight", None)

    @property
    def weight_shape(self) -> torch.Size:
        """[out, in]: the weight's shape, also when it is stored as GGUF blocks."""
        return torch.Size((self.out_features, self.in_features))

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, upcast, scaled or dequantised for this call (a temporary unless it is the
        parameter itself)."""
        if self.gguf_type is not None:
            return gguf.dequantize(self.weight, self.gguf_type, self.weight_shape, dtype)
        weight = self.weight.to(dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(dtype)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        weight = self.compute_weight(dtype)
        table = self.__dict__.get(PATCHES)
        if not table:
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x.to(dtype), weight, bias)
        x = x.to(dtype)
        # A low-rank patch costs tokens·r·(in + out) on the activations, or r·in·out to fold into this call's weight
        # (a temporary, like the upcast): whichever is less. Video DiTs see thousands of tokens, so mostly the fold.
        on_activations = x.numel() // x.shape[-1] * (self.in_features + self.out_features) < \
            self.in_features * self.out_features
        low_rank = []
        for patch in table.get("weight", ()):
            if patch.low_rank and on_activations:
                low_rank.append(patch.factors(x.device, dtype))
            elif patch.low_rank:
                down, up = patch.factors(weight.device, dtype)
                weight = torch.addmm(weight, up, down)
            else:
                weight = weight + patch.full(dtype, weight.device).reshape(weight.shape)
        bias = None if self.bias is None else patched(self, "bias", dtype)
        out = F.linear(x, weight, bias)
        for down, up in low_rank:  # x·downᵀ·upᵀ
            out = out + F.linear(F.linear(x, down), up)
        return out


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
        if isinstance(m, Linear) and m.gguf_type is None:  # GGUF blocks stay as they are
            weight = m.weight.data
            if m.scale_weight is not None:
                weight = weight.float() * m.scale_weight.float()
                m.scale_weight = None
            m.weight = nn.Parameter(weight.to(dtype), requires_grad=False)


def weight_workspace_bytes(model: nn.Module) -> int:
    """Bytes of the largest temporary weight copy a forward makes: `Linear` upcasts weights stored in another
    dtype (fp8, or bf16 in a float32 layer) for each call, a scaled fp8 weight needs one more copy, and GGUF
    blocks are dequantised through float32."""
    largest = 0
    for m in model.modules():
        if isinstance(m, Linear):
            dtype = m.compute_dtype or torch.float32
            size = torch.empty(0, dtype=dtype).element_size() * m.in_features * m.out_features
            if m.gguf_type is not None:
                largest = max(largest, size + (4 * m.in_features * m.out_features if size < 4 * m.in_features
                                               * m.out_features else 0))
            elif m.weight.dtype != dtype:
                largest = max(largest, (2 if m.scale_weight is not None else 1) * size)
    return largest


def quantize(layer: Linear, qtype: int) -> None:
    """Make `layer` keep its weight as GGUF blocks of type `qtype` (a uint8 buffer named `weight`, one row of
    blocks per output feature), dequantised on every call; the blocks are assigned afterwards (`load_into`)."""
    row_bytes = gguf.row_bytes(qtype, layer.in_features)
    del layer.weight
    layer.register_buffer("weight", torch.empty(layer.out_features, row_bytes, dtype=torch.uint8, device="meta"))
    layer.gguf_type = qtype


def parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """{name: shape} of every parameter and buffer, GGUF weights with their real (not their blocks') shape."""
    shapes = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.gguf_type is not None:
            shapes[f"{name}.weight" if name else "weight"] = m.weight_shape
    return shapes
