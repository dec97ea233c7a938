"""fp8 matrix multiply (`sora.ops.FP8_E4M3FN_FAST`, ComfyUI's fp8_e4m3fn_fast): its error against the bf16 and
float32 products, the upcast fallback where the device has no fp8 units, and patches and GGUF weights through it.

Error model. e4m3 keeps 3 mantissa bits: rounding a value whose mantissa m lies in [1, 2) errs by at most half an
ulp, 2^-4, uniformly, so its relative rms error is 2^-3 / sqrt(12) · E[1/m] = 2^-3 · ln 2 / sqrt(12) ≈ 0.025
(E8 below) for mantissas spread log-uniformly, as those of random data are. The fp8 product quantises both
operands: independent errors add in quadrature, sqrt(2) · E8 ≈ 0.035 relative (Frobenius) error of the output;
the bound takes 1.5 times that. Against the same operands dequantised and multiplied in float32, only the bf16
output rounding remains: at most two bf16 roundings (product, bias) of the largest value, 2 · 2^-9 · 2 = 2^-7 of
the output's largest magnitude.

The tests that take the `device` fixture run on the CPU here (whose torch build has `torch._scaled_mm` for fp8,
without fp8 units) and on a GPU in `benchmarks/device_check.py` (`pytest -m device --device cuda`).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sora import gguf, ops
from sora.dit import DiTConfig, WanDiT, load_dit
from sora.lora import LowRank
from sora.ops import FP8_E4M3FN_FAST, BoundPatch

E8 = 2**-3 * math.log(2) / math.sqrt(12)  # relative rms rounding error of e4m3 (module docstring)
PRODUCT_TOL = 1.5 * math.sqrt(2) * E8  # both operands quantised
DEQUANT_TOL = 2**-7  # against the dequantised operands: the bf16 output's rounding only


def rel_fro(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rel_max(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def scaled_mm_error(device: torch.device) -> str | None:
    """None when `torch._scaled_mm` multiplies e4m3 into bf16 on `device`, else why not."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    a = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        return f"torch._scaled_mm refuses float8_e4m3fn on {device} ({str(e).splitlines()[0]})"
    return None


@pytest.fixture
def scaled_mm(device):
    """The test device, where `torch._scaled_mm` takes e4m3 (skips, saying why, where it does not)."""
    reason = scaled_mm_error(device)
    if reason is not None:
        pytest.skip(reason)
    return device


def fast_layer(n_in: int, n_out: int, *, bias: bool = True, seed: int = 0) -> tuple[ops.Linear, nn.Linear]:
    """(an ops.Linear stored with FP8_E4M3FN_FAST, the float32 nn.Linear it came from); weights of std 0.02 like a
    trained DiT's, most of whose values a plain e4m3 cast would push into the subnormals."""
    generator = torch.Generator().manual_seed(seed)
    reference = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(n_out, n_in, generator=generator) * 0.02)
        if bias:
            reference.bias.copy_(torch.randn(n_out, generator=generator) * 0.1)
    layer = ops.Linear(n_in, n_out, bias=bias)
    layer.load_state_dict(reference.state_dict())
    ops.cast_weights(layer, FP8_E4M3FN_FAST)
    return layer.requires_grad_(False), reference.requires_grad_(False)


def activations(tokens: int, n_in: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, tokens, n_in, generator=torch.Generator().manual_seed(seed))


def todays_upcast(layer: ops.Linear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The upcast path written out: the weight times its scale in `dtype`, then F.linear."""
    weight = layer.weight.to(dtype) * layer.scale_weight.to(dtype)
    return F.linear(x.to(dtype), weight, None if layer.bias is None else layer.bias.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------

def test_storage_is_e4m3_with_a_per_tensor_scale_closer_than_a_plain_cast():
    layer, reference = fast_layer(256, 128)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.fp8_matmul
    assert layer.scale_weight.dtype == torch.float32 and layer.scale_weight.ndim == 0
    assert layer.weight.float().abs().max() == 448  # the largest magnitude lands on e4m3's largest value
    assert layer.bias.dtype == torch.float32  # only weights are stored in fp8
    stored = layer.weight.float() * layer.scale_weight
    plain = reference.weight.to(torch.float8_e4m3fn).float()  # the fp8_e4m3fn option's plain cast
    assert rel_fro(stored, reference.weight) <= 1.1 * E8 < rel_fro(plain, reference.weight)


def test_e4m3_files_keep_their_weights_and_scales():
    layer = ops.Linear(64, 32)
    weight = (torch.randn(32, 64) * 100).to(torch.float8_e4m3fn)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.scale_weight = torch.tensor(3e-4)  # a ComfyUI "scaled fp8" layer
    ops.cast_weights(layer, FP8_E4M3FN_FAST)
    assert layer.fp8_matmul and layer.weight.data_ptr() == weight.data_ptr()
    assert layer.scale_weight.item() == pytest.approx(3e-4)


def test_gguf_weights_stay_quantised_and_compute_as_before():
    layer = ops.Linear(64, 32)
    weight = torch.randn(32, 64) * 0.02
    ops.quantize(layer, 1)  # GGUF type F16: blocks are the raw half-precision bytes
    layer.weight = weight.half().view(torch.uint8).reshape(32, -1)
    layer.bias = nn.Parameter(torch.zeros(32), requires_grad=False)
    x = activations(8, 64)
    before = layer(x)
    ops.cast_weights(layer, FP8_E4M3FN_FAST)
    assert layer.gguf_type == 1 and layer.weight.dtype == torch.uint8 and not layer.fp8_matmul
    assert torch.equal(layer(x), before)
    assert torch.equal(before, F.linear(x, gguf.dequantize(layer.weight, 1, (32, 64)), layer.bias))


# ---------------------------------------------------------------------------------------------------------------
# The fp8 product where torch._scaled_mm exists (the CPU build has it; on a GPU with fp8 units it is the fast path)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_in, n_out, tokens", [(256, 64, 32), (1024, 32, 16)])  # ~1 s each on the CPU
def test_fp8_product_error_against_bf16_and_float32(scaled_mm, n_in, n_out, tokens):
    layer, reference = fast_layer(n_in, n_out)
    layer.to(scaled_mm)
    reference.to(scaled_mm)
    x = activations(tokens, n_in).to(scaled_mm)
    exact = reference(x)  # float32 weights and inputs
    bias = layer.bias.to(torch.bfloat16)
    out = ops.fp8_linear(x.bfloat16(), layer.weight, layer.scale_weight, bias, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (1, tokens, n_out)

    # the same operands, quantised as fp8_linear does, dequantised and multiplied in float32
    x_scale = x.bfloat16().abs().amax().float() / ops.FP8_MAX
    quantised = (x.bfloat16() * x_scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)
    dequantised = F.linear(quantised.float() * x_scale, layer.weight.float() * layer.scale_weight, layer.bias)
    assert rel_max(out, dequantised) <= DEQUANT_TOL  # scales applied once each, in the right place

    bf16 = F.linear(x.bfloat16(), reference.weight.bfloat16(), bias)
    assert rel_fro(bf16, exact) < 0.01  # bf16 itself: 2^-9 per operand
    error = rel_fro(out, exact)
    assert 0.5 * math.sqrt(2) * E8 < error <= PRODUCT_TOL  # fp8's own rounding, not a broken scale
    assert rel_fro(out, bf16) <= PRODUCT_TOL


def test_input_scale_follows_the_input(scaled_mm):
    """Inputs far outside e4m3's range (|x| ~ 1e4, or ~1e-4) come out as well as ordinary ones: the input is
    scaled per tensor before the cast, not clamped to ±448 or flushed to zero."""
    layer, reference = fast_layer(128, 64, bias=False)
    layer.to(scaled_mm)
    reference.to(scaled_mm)
    for magnitude in (1e4, 1.0, 1e-4):
        x = activations(32, 128).to(scaled_mm) * magnitude
        out = ops.fp8_linear(x.bfloat16(), layer.weight, layer.scale_weight, None, torch.bfloat16)
        assert rel_fro(out, reference(x)) <= PRODUCT_TOL, magnitude


# ---------------------------------------------------------------------------------------------------------------
# ops.Linear: which path a call takes
# ---------------------------------------------------------------------------------------------------------------

def calls_of(monkeypatch) -> list:
    """Record the calls of `ops.fp8_linear` (the fast path) and let them through."""
    calls, real = [], ops.fp8_linear

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, "fp8_linear", spy)
    return calls


@pytest.fixture
def fp8_units(monkeypatch, device):
    """Pretend the test device has fp8 units, so that ops.Linear takes the fast path on it (the CPU's
    torch._scaled_mm computes it); on a GPU that has them this changes nothing."""
    reason = scaled_mm_error(device)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(ops, "fp8_matmul_available", lambda d: True)
    return device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_without_fp8_units_the_call_is_todays_upcast_bit_for_bit(monkeypatch, dtype):
    layer, _ = fast_layer(64, 48)
    layer.compute_dtype = dtype
    calls = calls_of(monkeypatch)
    x = activations(10, 64)
    assert not ops.fp8_matmul_available(torch.device("cpu"))
    assert not layer.uses_fp8_matmul(x, dtype)
    out = layer(x)
    plain = ops.Linear(64, 48)  # the same e4m3 weight and scale, fast option off
    plain.weight, plain.bias, plain.scale_weight = layer.weight, layer.bias, layer.scale_weight
    plain.compute_dtype = dtype
    assert not plain.fp8_matmul and torch.equal(out, plain(x))
    assert torch.equal(out, todays_upcast(layer, x, dtype)) and not calls


def test_fp8_units_on_this_device_are_detected(device):
    if device.type != "cuda":
        assert not ops.fp8_matmul_available(device)
    else:
        major, minor = torch.cuda.get_device_capability(device)
        assert ops.fp8_matmul_available(device) == ((major, minor) >= (8, 9) and torch.version.hip is None)


def test_fast_path_takes_the_fp8_product(fp8_units, monkeypatch):
    layer, reference = fast_layer(256, 64)
    layer.to(fp8_units).compute_dtype = torch.bfloat16
    reference.to(fp8_units)
    calls = calls_of(monkeypatch)
    x = activations(40, 256).to(fp8_units)
    assert layer.uses_fp8_matmul(x, torch.bfloat16)
    out = layer(x)
    assert calls == [(64, 256)] and out.dtype == torch.bfloat16
    assert torch.equal(out, ops.fp8_linear(x.bfloat16(), layer.weight, layer.scale_weight,
                                           layer.bias.bfloat16(), torch.bfloat16))
    assert rel_fro(out, reference(x)) <= PRODUCT_TOL


@pytest.mark.parametrize("why", ["float32 compute", "features not multiples of 16", "full delta", "e5m2 weight",
                                 "option off"])
def test_fast_path_falls_back_to_the_upcast(fp8_units, monkeypatch, why):
    n_in = 72 if why == "features not multiples of 16" else 64
    layer, _ = fast_layer(n_in, 32)
    layer.to(fp8_units)
    dtype = torch.float32 if why == "float32 compute" else torch.bfloat16
    layer.compute_dtype = dtype
    if why == "e5m2 weight":
        layer.weight = nn.Parameter(layer.weight.to(torch.float8_e5m2), requires_grad=False)
    if why == "option off":
        layer.fp8_matmul = False
    table = {}
    if why == "full delta":
        full = torch.randn(32, n_in) * 1e-3
        table = {"": {"weight": (BoundPatch(FullDelta(full), 1.0),)}}
    calls = calls_of(monkeypatch)
    x = activations(12, n_in).to(fp8_units)
    with ops.installed(layer, table):
        assert not layer.uses_fp8_matmul(x, dtype)
        out = layer(x)
    expected = todays_upcast(layer, x, dtype)
    if why == "full delta":
        weight = layer.weight.to(dtype) * layer.scale_weight.to(dtype) + full.to(fp8_units, dtype)
        expected = F.linear(x.to(dtype), weight, layer.bias.to(dtype))
    assert not calls and torch.equal(out, expected)


class FullDelta:
    """A full-size weight patch (not low-rank): `delta(strength, dtype)`."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def delta(self, strength: float, dtype: torch.dtype) -> torch.Tensor:
        return (self.value * strength).to(dtype)


def test_low_rank_patches_apply_on_the_activations_beside_the_fp8_product(fp8_units, monkeypatch):
    layer, reference = fast_layer(256, 64)
    layer.to(fp8_units).compute_dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(5)
    lora = LowRank(torch.randn(8, 256, generator=generator) * 0.1, torch.randn(64, 8, generator=generator) * 0.1,
                   alpha=4.0)
    bias_delta = FullDelta(torch.randn(64, generator=generator))
    table = {"": {"weight": (BoundPatch(lora, 0.8),), "bias": (BoundPatch(bias_delta, 0.5),)}}
    calls = calls_of(monkeypatch)
    x = activations(60, 256).to(fp8_units)  # > 256·64 / (256 + 64) tokens: the upcast path folds the patch
    base = layer(x)
    with ops.installed(layer, table):
        assert layer.uses_fp8_matmul(x, torch.bfloat16)
        out = layer(x)
    assert len(calls) == 2
    down, up = lora.down.to(fp8_units), lora.up.to(fp8_units) * (0.8 * lora.scale)
    change = F.linear(F.linear(x, down), up) + 0.5 * bias_delta.value.to(fp8_units)
    assert rel_max(out.float() - base.float(), change) < 0.02  # the patch, in bf16, on top of the same fp8 product

    patched = reference.weight.to(fp8_units) + 0.8 * lora.scale * lora.up.to(fp8_units) @ lora.down.to(fp8_units)
    exact = F.linear(x, patched, reference.bias.to(fp8_units) + 0.5 * bias_delta.value.to(fp8_units))
    assert rel_fro(out, exact) <= PRODUCT_TOL
    with ops.installed(layer, table):  # the fold the upcast path makes, for comparison: the same result within fp8
        monkeypatch.setattr(ops, "fp8_matmul_available", lambda d: False)
        assert rel_fro(layer(x), exact) <= PRODUCT_TOL


# ---------------------------------------------------------------------------------------------------------------
# The loader option
# ---------------------------------------------------------------------------------------------------------------

def tiny_file(tmp_path) -> tuple[str, WanDiT]:
    config = DiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=32, text_len=8, freq_dim=32)
    model = WanDiT(config).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.02 if p.ndim >= 2 else 0.1))
    path = tmp_path / "tiny_dit_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, path)
    return str(path), model


def dit_inputs(device: torch.device):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 2, 8, 8, generator=generator)
    return x.to(device), torch.tensor([600.0], device=device), torch.randn(1, 5, 32, generator=generator).to(device)


def test_load_dit_with_the_fast_option(tmp_path, device):
    path, _ = tiny_file(tmp_path)
    fast = load_dit(path, weight_dtype=FP8_E4M3FN_FAST, compute_dtype=torch.bfloat16, device=device)
    bf16 = load_dit(path, compute_dtype=torch.bfloat16, device=device)
    linears = [m for m in fast.modules() if isinstance(m, ops.Linear)]
    assert linears and all(m.fp8_matmul and m.weight.dtype == torch.float8_e4m3fn and m.scale_weight is not None
                           for m in linears)
    assert fast.loaded_from[1] is FP8_E4M3FN_FAST  # the processes of Sora Parallel load the same way
    inputs = dit_inputs(device)
    with torch.no_grad():
        out, reference = fast(*inputs), bf16(*inputs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # 2 blocks of e4m3 weights (and, with fp8 units, inputs) against bf16: within twice one product's error
    assert rel_fro(out, reference) <= 2 * PRODUCT_TOL


def test_the_fast_dit_forward_multiplies_every_block_linear_in_fp8(tmp_path, fp8_units, monkeypatch):
    path, _ = tiny_file(tmp_path)
    fast = load_dit(path, weight_dtype=FP8_E4M3FN_FAST, compute_dtype=torch.bfloat16, device=fp8_units)
    bf16 = load_dit(path, compute_dtype=torch.bfloat16, device=fp8_units)
    inputs = dit_inputs(fp8_units)
    calls = calls_of(monkeypatch)
    with torch.no_grad():
        out, reference = fast(*inputs), bf16(*inputs)
    block_linears = sum(isinstance(m, ops.Linear) for m in fast.blocks.modules())
    float32_linears = sum(isinstance(m, ops.Linear) for name in fast._keep_in_fp32_modules
                          for m in fast.get_submodule(name).modules())
    linears = sum(isinstance(m, ops.Linear) for m in fast.modules())
    assert len(calls) == linears - float32_linears >= block_linears  # the float32 modules keep the upcast
    assert rel_fro(out, reference) <= 2 * PRODUCT_TOL


def test_the_dit_loader_node_offers_the_fast_option(tmp_path, fresh_manager):
    from sora.nodes import loaders

    options = loaders.SoraModelLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    assert "fp8_e4m3fn_fast" in options and "fp8_e4m3fn" in options
    path, _ = tiny_file(tmp_path)
    load = loaders.SoraModelLoader().load
    fast = load(loaders.NANO, "fp8_e4m3fn_fast", "bf16", "sdpa", loaders.AUTO_EXPERT, path=path)[0].model
    plain = load(loaders.NANO, "fp8_e4m3fn", "bf16", "sdpa", loaders.AUTO_EXPERT, path=path)[0].model
    assert fast is not plain  # two cache entries: the fast flag never leaks into the plain fp8 model
    assert fast.blocks[0].ffn[0].fp8_matmul and not plain.blocks[0].ffn[0].fp8_matmul
    assert fast.blocks[0].ffn[0].scale_weight is not None and plain.blocks[0].ffn[0].scale_weight is None
