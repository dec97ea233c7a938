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

fp8 matrix multiply (`FP8_E4M3FN_FAST`, ComfyUI's "fp8_e4m3fn_fast"): a layer whose weight dtype option asked for
it stores its weight as float8_e4m3fn with a per-tensor float32 scale and, where the device has fp8 matrix units
(CUDA compute capability 8.9 or later, `fp8_matmul_available`), multiplies in fp8 through `torch._scaled_mm`: the
input is quantised per tensor to e4m3 with its own scale (largest magnitude / 448) and the product comes out in the
compute dtype. Elsewhere the same weight is upcast per call like any fp8 weight. Low-rank patches still apply on
the activations (beside the fp8 product); a full delta, a float32 compute dtype or a shape the kernel refuses
(features not multiples of 16) takes the upcast path.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import gguf

PATCHES = "sora_patches"  # module attribute: {parameter name: (BoundPatch, ...)} while a patched forward runs
FP8_MAX = 448.0  # the largest float8_e4m3fn


@dataclass(frozen=True)
class Fp8Matmul:
    """A weight dtype option (`sora.checkpoints.build`, `sora.dit.load_dit(weight_dtype=...)`): Linear weights stored
    in float8_e4m3fn with a per-tensor scale and multiplied in fp8 where the device can (module docstring)."""
    dtype: torch.dtype = torch.float8_e4m3fn


FP8_E4M3FN_FAST = Fp8Matmul()


@functools.cache
def _has_fp8_units(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_matmul_available(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` multiplies float8_e4m3fn on fp8 matrix units of `device`: NVIDIA GPUs of compute
    capability 8.9 (Ada) and later. The CPU build has the op too, but it upcasts inside: no gain there."""
    if device.type != "cuda" or torch.version.hip is not None or not hasattr(torch, "_scaled_mm"):
        return False
    return _has_fp8_units(device.index if device.index is not None else torch.cuda.current_device())


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """`x · (weight · weight_scale)ᵀ + bias` through `torch._scaled_mm`, x quantised per tensor to e4m3.

    x [..., in] in a float dtype; weight [out, in] float8_e4m3fn, contiguous; weight_scale a float32 scalar on x's
    device; bias [out] in `out_dtype` or None. Returns [..., out] in `out_dtype`.
    """
    rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
    amax = torch.linalg.vector_norm(rows, ord=float("inf")).float()  # max |x| (exact), no [tokens, in] temporary
    x_scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    # x · (1 / scale) is computed in float32 and rounded to x's dtype (a 0-dim float32 factor does not promote it),
    # then to e4m3; the clamp keeps a value rounded just past 448 from becoming NaN in the cast.
    quantised = (rows * x_scale.reciprocal()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(quantised, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().reshape(()),
                           bias=bias, out_dtype=out_dtype)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    return out.reshape(*x.shape[:-1], weight.shape[0])


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
        self.fp8_matmul = False  # multiply an e4m3 weight in fp8 where the device can (`FP8_E4M3FN_FAST`)
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

    def uses_fp8_matmul(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether this call multiplies in fp8 (`fp8_linear`): the layer asked for it, its weight is e4m3 in a shape
        the kernel takes, the compute dtype is 16-bit, the device has fp8 units, and every weight patch installed
        is low-rank (those apply on the activations; a full delta needs the upcast weight)."""
        if not (self.fp8_matmul and self.gguf_type is None and self.weight.dtype == torch.float8_e4m3fn
                and dtype in (torch.bfloat16, torch.float16) and self.in_features % 16 == 0
                and self.out_features % 16 == 0 and self.weight.is_contiguous()):
            return False
        table = self.__dict__.get(PATCHES) or {}
        return all(patch.low_rank for patch in table.get("weight", ())) and fp8_matmul_available(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        table = self.__dict__.get(PATCHES)
        if self.uses_fp8_matmul(x, dtype):
            return self._fp8_forward(x.to(dtype), dtype, table or {})
        weight = self.compute_weight(dtype)
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

    def _fp8_forward(self, x: torch.Tensor, dtype: torch.dtype, table: Mapping) -> torch.Tensor:
        """The fp8 product plus the low-rank patches on the activations (always there: folding one into the weight
        would need the upcast weight the fp8 product avoids)."""
        scale = self.scale_weight if self.scale_weight is not None else torch.ones((), device=x.device)
        bias = None if self.bias is None else patched(self, "bias", dtype)
        out = fp8_linear(x, self.weight, scale, bias, dtype)
        for patch in table.get("weight", ()):
            down, up = patch.factors(x.device, dtype)
            out = out + F.linear(F.linear(x, down), up)
        return out


def set_compute_dtype(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Set the matmul dtype of every `Linear` in `module` (None: follow the input)."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.compute_dtype = dtype


def cast_weights(module: nn.Module, dtype: torch.dtype | Fp8Matmul) -> None:
    """Store the weights of every `Linear` in `dtype` (the loaders' "weight dtype" option).

    Casting to fp8 is a plain cast, like ComfyUI's `fp8_e4m3fn` option; an existing `scale_weight` is folded in
    first so that no information about the scale is lost. `FP8_E4M3FN_FAST` keeps e4m3 weights (and their scale) as
    they are and stores any other as e4m3 with a per-tensor scale (largest magnitude / 448), then turns on the fp8
    product (`Linear.fp8_matmul`).
    """
    for m in module.modules():
        if isinstance(m, Linear) and m.gguf_type is None:  # GGUF blocks stay as they are
            if isinstance(dtype, Fp8Matmul):
                _store_scaled_e4m3(m)
                continue
            weight = m.weight.data
            if m.scale_weight is not None:
                weight = weight.float() * m.scale_weight.float()
                m.scale_weight = None
            m.weight = nn.Parameter(weight.to(dtype), requires_grad=False)


def _store_scaled_e4m3(layer: Linear) -> None:
    layer.fp8_matmul = True
    if layer.weight.dtype == torch.float8_e4m3fn:
        return
    weight = layer.weight.data.float()
    if layer.scale_weight is not None:
        weight = weight * layer.scale_weight.float()
    scale = (weight.abs().amax() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    layer.weight = nn.Parameter((weight / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
                                requires_grad=False)
    layer.scale_weight = scale


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
