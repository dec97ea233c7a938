"""Compiled blocks (`sora.compile`): torch.compile on the repeated block gives the eager output, compiles one graph
for every layer and every video size, leaves other handles on the shared model eager, and falls back to eager
with one warning where compilation is unavailable or fails."""
import dataclasses
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from sora import compile as compiled_blocks
from sora.dit import PRESETS, WanDiT
from sora.handle import ModelHandle, WeightPatch
from sora.nodes.speed import SoraCompileBlocks

pytestmark = pytest.mark.usefixtures("fresh_manager")


def tiny_dit() -> WanDiT:
    model = WanDiT(dataclasses.replace(PRESETS["tiny"], num_layers=3)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def inputs(frames: int, height: int, width: int, rows: int = 5):
    generator = torch.Generator().manual_seed(frames * 100 + height * 10 + width)
    x = torch.randn(1, 16, frames, height, width, generator=generator)
    return x, torch.full((1,), 600.0), torch.randn(1, rows, 24, generator=generator)


@torch.no_grad()
def test_compiled_blocks_match_eager_with_one_graph_for_every_layer_and_size():
    reason = compiled_blocks.unavailable("cpu")
    if reason is not None:
        pytest.skip(f"inductor cannot build here: {reason}")
    model = tiny_dit()
    eager = ModelHandle(model, "tiny")
    fast = compiled_blocks.compile_blocks(eager, compiled_blocks.CompileSettings(), "cpu")
    assert fast is not eager and isinstance(fast.wrappers[0], compiled_blocks.CompiledBlocks)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    for size in ((2, 4, 4), (3, 4, 6), (2, 6, 8)):  # 8, 18 and 24 tokens
        x, t, context = inputs(*size)
        torch.testing.assert_close(fast(x, t, context), eager(x, t, context), rtol=1e-5, atol=1e-5)
        assert all("forward" not in block.__dict__ for block in model.blocks)  # installed only during the call
    assert fast.wrappers[0].disabled is None
    assert counters["stats"]["unique_graphs"] - before == 1  # one block graph, reused by 3 layers and 3 sizes


@torch.no_grad()
def test_the_matmul_attention_compiles_one_graph_for_every_size_too():
    """The "matmul" backend's chunk loop depends on the token count: inside the compiled block attention runs as
    SDPA, so that a new video size does not compile again. bf16: the outputs agree within bf16 rounding
    (4·eps·sqrt(layers) of the largest output, benchmarks/dit_forward.py's bound)."""
    reason = compiled_blocks.unavailable("cpu")
    if reason is not None:
        pytest.skip(f"inductor cannot build here: {reason}")
    model = tiny_dit()
    model.set_compute(dtype=torch.bfloat16, attention="matmul")
    eager = ModelHandle(model, "tiny")
    fast = compiled_blocks.compile_blocks(eager, compiled_blocks.CompileSettings(), "cpu")
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    for size in ((2, 4, 4), (3, 4, 6), (2, 6, 8)):
        x, t, context = inputs(*size)
        out, expected = fast(x, t, context), eager(x, t, context)
        assert (out - expected).abs().max() <= 4 * 2**-8 * 3**0.5 * expected.abs().max()
    assert fast.wrappers[0].disabled is None
    assert counters["stats"]["unique_graphs"] - before == 1


@torch.no_grad()
def test_blocks_patched_by_a_lora_keep_their_patches():
    reason = compiled_blocks.unavailable("cpu")
    if reason is not None:
        pytest.skip(f"inductor cannot build here: {reason}")

    class Delta:
        def delta(self, strength, dtype):
            return torch.full((32, 32), 0.05 * strength, dtype=dtype)

    model = tiny_dit()
    plain = ModelHandle(model, "tiny")
    patched = plain.patched(WeightPatch("blocks.1.self_attn.q.weight", Delta(), 1.0))
    x, t, context = inputs(2, 4, 4)
    compiled_blocks.compile_blocks(plain, device="cpu")(x, t, context)  # a graph traced without patches exists
    torch.testing.assert_close(compiled_blocks.compile_blocks(patched, device="cpu")(x, t, context),
                               patched(x, t, context), rtol=1e-5, atol=1e-5)


def test_no_compiler_means_the_model_as_it_was_and_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(compiled_blocks, "unavailable", lambda device="cpu": "no C++ compiler (test)")
    handle = ModelHandle(tiny_dit(), "tiny")
    with caplog.at_level(logging.WARNING, logger="sora.compile"):
        assert compiled_blocks.compile_blocks(handle, device="cpu") is handle
    assert caplog.text.count("no C++ compiler (test)") == 1
    result = SoraCompileBlocks().apply(handle, "default", True)
    assert result["result"][0] is handle and "not compiled" in result["ui"]["text"][0]


@torch.no_grad()
def test_a_failing_compilation_runs_eagerly_after_one_warning(caplog):
    model = tiny_dit()
    eager = ModelHandle(model, "tiny")
    wrapper = compiled_blocks.CompiledBlocks(model)

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found")

    wrapper._compiled = broken
    fast = eager.wrapped(wrapper)
    x, t, context = inputs(2, 4, 4)
    with caplog.at_level(logging.WARNING, logger="sora.compile"):
        for _ in range(2):
            assert torch.equal(fast(x, t, context), eager(x, t, context))
    assert caplog.text.count("running eagerly") == 1 and "No working C++ compiler" in wrapper.disabled
    assert all("forward" not in block.__dict__ for block in model.blocks)


def test_errors_of_the_model_itself_are_not_taken_for_compile_failures():
    model = tiny_dit()
    wrapper = compiled_blocks.CompiledBlocks(model)
    wrapper._compiled = lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("a real bug"))
    x, t, context = inputs(2, 4, 4)
    with pytest.raises(ValueError, match="a real bug"):
        ModelHandle(model, "tiny").wrapped(wrapper)(x, t, context)
    assert wrapper.disabled is None


def test_compile_settings_are_checked():
    with pytest.raises(compiled_blocks.InputError, match="mode"):
        compiled_blocks.CompileSettings(mode="fastest")
