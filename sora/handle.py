"""Model handles: a loaded diffusion model as one branch of a graph sees it.

A loaded model is shared: the model cache hands the same weights to every node that loads the file, and the memory
manager places them once for everyone. What a graph does to the model lives on a `ModelHandle` instead:

- `patches`: weight patches (LoRAs, full deltas), in order, each a delta of one parameter at a strength. They
  never touch the stored weights: for each call of the handle they are installed on the layers they patch and
  removed afterwards (`sora.ops.installed`), so two handles on one model compute independently, fp8 weights stay
  fp8 and a streamed block carries its patches.
- `wrappers`: forward wrappers (step caches, compiled blocks, parallel execution), outermost first. A wrapper is
  called as `wrapper(forward, x, timestep, context, call, **conditions)` and returns the velocity, usually by
  calling `forward(x, timestep, context, call, **conditions)`; `call` (a `ModelCall`, or None outside a sampler)
  says which step and which guidance passes the call is for; `conditions` are the model's keyword inputs (image
  tokens, VACE contexts, `blocks` for a block-stack hook; see `sora.dit.WanDiT.forward`).
- `memory`: Sora Memory Options for this model (a budget while it runs, blocks kept resident), applied by the
  memory manager on every call.
- `runner`: where the model itself runs: None in this process; `sora.parallel` sets one that runs each call on a
  group of processes (several devices) with this handle's patches, after the wrappers ran here.

Handles are frozen: `patched`, `wrapped` and `with_memory` return new ones and leave the old one as it was, so
cloning is cheap and a node never changes its input. The contract for code that extends a handle is in
CONTRIBUTING.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from . import memory, ops
from .errors import InputError

SINGLE, HIGH_NOISE, LOW_NOISE = "single model", "high noise", "low noise"
EXPERTS = (SINGLE, HIGH_NOISE, LOW_NOISE)


@dataclass(frozen=True)
class ModelCall:
    """What one model call is for: sampling step `step` (0-based) of `steps` at noise level `sigma`, and the
    guidance pass of each batch chunk, in order (e.g. ("cond", "uncond") for batched guidance)."""
    step: int
    steps: int
    sigma: float
    passes: tuple[str, ...] = ("cond",)


Forward = Callable[..., torch.Tensor]  # (x, timestep, context, call, **conditions) -> velocity
Runner = Callable[..., torch.Tensor]  # (handle, x, timestep, context, call, **conditions) -> velocity


class ForwardWrapper(Protocol):
    def __call__(self, forward: Forward, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 call: ModelCall | None, **conditions) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class WeightPatch:
    """A change of one parameter of the model: `target` is its name in the model ("blocks.0.self_attn.q.weight"),
    `delta` an object with `delta(strength, dtype) -> Tensor` (a `sora.lora` patch), `source` where it came from
    (a LoRA file name, for reports)."""
    target: str
    delta: object
    strength: float
    source: str = ""


@dataclass(frozen=True)
class MemorySettings:
    """Per-model memory options: `budget_bytes` while the model runs (None: the manager's), `blocks_resident`
    transformer blocks kept on the device (None: as many as fit)."""
    budget_bytes: int | None = None
    blocks_resident: int | None = None


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """A shared model plus this branch's patches, wrappers and memory settings (see the module docstring).

    model: a `sora.dit.WanDiT` (or any module or callable `model(x, timestep, context)` with a `config` that has
        `latent_format` and `per_token_timesteps`); name: the file name, for messages; expert: SINGLE, HIGH_NOISE or
        LOW_NOISE (Wan 2.2 A14B).
    """
    model: Callable
    name: str = "model"
    expert: str = SINGLE
    patches: tuple[WeightPatch, ...] = ()
    wrappers: tuple[ForwardWrapper, ...] = ()
    memory: MemorySettings = MemorySettings()
    runner: Runner | None = None
    _devices: dict = field(default_factory=dict, repr=False, compare=False)  # device -> patch table (see _table)

    def __post_init__(self):
        if self.expert not in EXPERTS:
            raise InputError(f"expert must be one of {EXPERTS}, got {self.expert!r}")

    # -- what the model is ---------------------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def latent_format(self):
        """The model's `sora.latent_formats.LatentFormat` (channels, compression, statistics)."""
        from .latent_formats import format_of
        return format_of(self.config.latent_format)

    @property
    def task(self) -> str:
        """The key of the model's reference settings in `sora.schedules.DEFAULTS`."""
        config = self.config
        if config.latent_format == "nano":
            return "nano"
        if config.model_type == "ti2v":
            return "wan22_ti2v_5b"
        if config.model_type == "flf2v":
            return "wan21_flf2v"
        if config.model_type == "i2v" and getattr(config, "image_dim", None) is not None:
            # Wan 2.1 I2V-14B: 480P and 720P share the shapes (not the shift); the file name tells them apart
            return "wan21_i2v_720p" if "720" in self.name else "wan21_i2v_480p"
        if config.model_type == "i2v":
            return "wan22_i2v_a14b"
        if getattr(config, "vace_layers", ()):
            return "wan21_vace"
        return "wan21_t2v" if self.expert == SINGLE else "wan22_t2v_a14b"

    def defaults(self):
        """The reference `sora.schedules.TaskDefaults` of this model, or None when none are registered."""
        from .schedules import DEFAULTS
        return DEFAULTS.get(self.task)

    # -- new handles -----------------------------------------------------------------------------------------------

    def patched(self, *patches: WeightPatch) -> ModelHandle:
        """A handle that also applies `patches` (after this one's)."""
        return dataclasses.replace(self, patches=self.patches + patches, _devices={})

    def wrapped(self, wrapper: ForwardWrapper) -> ModelHandle:
        """A handle whose calls also go through `wrapper` (inside this one's wrappers)."""
        return dataclasses.replace(self, wrappers=self.wrappers + (wrapper,), _devices={})

    def with_memory(self, **settings) -> ModelHandle:
        """A handle with other memory settings (`MemorySettings` fields)."""
        return dataclasses.replace(self, memory=dataclasses.replace(self.memory, **settings), _devices={})

    def run_on(self, runner: Runner | None) -> ModelHandle:
        """A handle whose model calls go to `runner(handle, x, timestep, context, call, **conditions)` instead of
        the model in this process (None: back to this process); wrappers still run here."""
        return dataclasses.replace(self, runner=runner, _devices={})

    # -- running ---------------------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 call: ModelCall | None = None, **conditions) -> torch.Tensor:
        """The velocity for `x` (see `sora.dit.WanDiT.forward`), through this handle's wrappers and patches;
        `conditions` go to the model as keyword inputs."""
        forward: Forward = self._forward
        for wrapper in reversed(self.wrappers):
            forward = functools.partial(wrapper, forward)
        return forward(x, timestep, context, call, **conditions)

    def _forward(self, x, timestep, context, call, **conditions):
        if self.runner is not None:
            return self.runner(self, x, timestep, context, call, **conditions)
        with self.placed(x, timestep, context), \
                ops.installed(self.model, self._table()) if self.patches else contextlib.nullcontext():
            return self.model(x, timestep, context, **conditions)

    @contextlib.contextmanager
    def placed(self, *args):
        """The memory manager holds the model, planned for the call `model(*args)`, with this handle's settings for
        the `with` block (a plain callable is not managed). The plan is the one the model's own forward hook makes,
        so nothing moves twice."""
        if not isinstance(self.model, nn.Module):
            yield
            return
        estimate = getattr(self.model, "activation_bytes", None)
        settings = self.memory
        with memory.get_manager().use(self.model, activation_bytes=estimate(args, {}) if estimate else 0,
                                      budget_bytes=settings.budget_bytes, blocks_resident=settings.blocks_resident):
            yield

    def _table(self) -> dict[str, dict[str, tuple[ops.BoundPatch, ...]]]:
        """{module path: {parameter name: patches}}, made once per handle."""
        table = self._devices.get("table")
        if table is None:
            grouped: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for patch in self.patches:
                if patch.strength == 0:
                    continue  # strength 0 is the base model, bit for bit
                module, _, name = patch.target.rpartition(".")
                grouped[module][name].append(ops.BoundPatch(patch.delta, patch.strength))
            table = {m: {n: tuple(p) for n, p in params.items()} for m, params in grouped.items()}
            self._devices["table"] = table
        return table


def as_handle(model) -> ModelHandle:
    """`model` itself when it is a handle, else a handle with no patches around it."""
    return model if isinstance(model, ModelHandle) else ModelHandle(model, getattr(model, "name", type(model).__name__))
