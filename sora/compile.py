"""Compiled transformer blocks: torch.compile on the DiT's repeated block, one graph reused for every layer.

Regional compilation (what diffusers calls `compile_repeated_blocks`): instead of the whole model, one function
that runs a `WanBlock` is compiled, and every block (VACE blocks too) calls it with its own weights, which the
compiled graph takes as inputs. The first forward compiles one block's graph (seconds to a minute, not minutes
for 30-40 layers), later forwards reuse it. The token and text dimensions are marked dynamic
(`torch._dynamo.maybe_mark_dynamic`), so another video size or prompt length runs the same graph instead of
compiling again.

The compiled forward is installed on the blocks only for the calls of the handle that asked for it
(`CompiledBlocks` is a handle wrapper), so other handles on the same shared model stay eager. Where compilation
cannot work (no C++ compiler for the CPU backend, no Triton for CUDA, an inductor failure) one warning says why and
the model runs eagerly, with the same results.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .errors import InputError

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileSettings:
    """mode: torch.compile's mode (MODES); dynamic: mark the token and text lengths dynamic, so that a new video
    size does not compile again (False: one specialised graph per size, sometimes a little faster)."""
    mode: str = "default"
    dynamic: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"compile mode {self.mode!r} is not one of {MODES}")


def unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why torch.compile's inductor backend cannot build kernels for `device` here, or None when it can."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (it needs torch 2.0 or newer)"
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            where = " (on Windows install triton-windows)" if platform.system() == "Windows" else ""
            return f"Triton is not installed{where}; inductor needs it for CUDA kernels"
        return None
    from torch._inductor import config as inductor_config
    configured = inductor_config.cpp.cxx
    names = [c for c in (configured if isinstance(configured, (tuple, list)) else (configured,)) if c]
    if not any(shutil.which(name) for name in (*names, "g++", "c++", "clang++", "cl")):
        return "no C++ compiler (g++, clang++ or MSVC's cl) was found; inductor builds its CPU kernels with one"
    return None


def _run_block(block: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The function that is compiled: one block's own forward (`WanBlock.forward`), the block an input."""
    return type(block).forward(block, *args, **kwargs)


class CompiledBlocks:
    """A forward wrapper (`ModelHandle.wrapped`) that runs `model.blocks` (and `vace_blocks`) through one compiled
    block function during the handle's calls; see the module docstring."""

    def __init__(self, model: nn.Module, settings: CompileSettings = CompileSettings()):
        if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
            raise InputError(f"{type(model).__name__} has no transformer blocks (`blocks`) to compile")
        self.model = model
        self.settings = settings
        options = {} if settings.mode == "default" else {"mode": settings.mode}
        self._compiled = torch.compile(_run_block, dynamic=None, **options)  # (imports torch._dynamo, used below)
        self.disabled: str | None = None  # why the blocks run eagerly, once compilation failed

    def blocks(self) -> list[nn.Module]:
        return [*self.model.blocks, *getattr(self.model, "vace_blocks", ())]

    def __call__(self, forward, x, timestep, context, call, **conditions):
        if self.disabled is None:
            reason = unavailable(_device_of(self.model, x))
            if reason is not None:
                self._disable(reason)
        if self.disabled is not None:
            return forward(x, timestep, context, call, **conditions)
        try:
            with self.installed():
                return forward(x, timestep, context, call, **conditions)
        except torch._dynamo.exc.TorchDynamoException as error:  # inductor and dynamo failures, not the model's
            self._disable(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}")
        return forward(x, timestep, context, call, **conditions)

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        log.warning("Sora Compile Blocks: torch.compile is not available here, running eagerly (same results, no "
                    "speed-up): %s", reason)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The compiled block forward on every block for the `with` block (instance attributes, removed after)."""
        blocks = self.blocks()
        try:
            for block in blocks:
                block.forward = functools.partial(self._call_block, block)
            yield
        finally:
            for block in blocks:
                block.__dict__.pop("forward", None)

    def _call_block(self, block: nn.Module, x: torch.Tensor, context: torch.Tensor, *args, **kwargs):
        if any(ops.PATCHES in m.__dict__ for m in block.modules()):
            # Weight patches (a LoRA, `sora.ops.installed`) sit in the layers' instance dicts, which the compiled
            # graph does not guard: a graph traced without them would silently drop them. Such a block runs eagerly.
            return type(block).forward(block, x, context, *args, **kwargs)
        if self.settings.dynamic:
            mark = torch._dynamo.maybe_mark_dynamic
            mark(x, 1)  # tokens
            mark(context, 1)  # text rows
            for tensor in (*args, *kwargs.values()):
                if isinstance(tensor, torch.Tensor) and tensor.ndim >= 2 and tensor.shape[1] == x.shape[1]:
                    mark(tensor, 1)  # per-token companions: rotations, timestep index, key counts
        return self._compiled(block, x, context, *args, **kwargs)


def _device_of(model: nn.Module, x) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def compile_blocks(handle, settings: CompileSettings = CompileSettings(), device: torch.device | str = "cpu"):
    """`handle` (a `sora.handle.ModelHandle`) whose calls run compiled blocks on `device` (the compute device);
    `handle` itself, with one warning, where compilation is unavailable there."""
    reason = unavailable(device)
    if reason is not None:
        log.warning("Sora Compile Blocks: torch.compile is not available here, running eagerly: %s", reason)
        return handle
    return handle.wrapped(CompiledBlocks(handle.model, settings))
