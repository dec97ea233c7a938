"""The process-wide memory manager: which weights live on the compute device, so that every graph fits it.

One `MemoryManager` per process (`get_manager()`) is shared by every stage. It knows a compute device (where models
run), an offload device (host memory, where idle weights wait) and a budget: the bytes it may place on the compute
device. Models are registered with their sizes; `with manager.use(model):` makes one ready to run, in one of three
placements:

- resident: all weights on the compute device;
- streamed (models with repeated blocks, the DiT): the model's other parts and as many blocks as fit stay on the
  device, the remaining blocks are copied in one at a time with prefetch (`sora.streaming`);
- offloaded: the weights stay in host memory and the model runs there (a model without repeated blocks that does
  not fit even after every idle model has left, e.g. a text encoder on a small card).

Room is made by moving idle models (registered, not in use) to the offload device, least recently used first. The
bytes of activations a call needs are planned too: for the DiT they are estimated from the token count of each
call (`dit_activation_bytes`), for the VAE the tile size is chosen from the room left (`budget_for`).

Out of memory (`retry_on_oom`): the failed step's tensors are released and the step runs again with a smaller
footprint: idle models leave, then the caller's own fallbacks (sequential guidance, smaller VAE tiles), then
fewer resident blocks.

Inside ComfyUI (its `comfy.model_management` is loaded) the manager asks it to free memory before placing weights
(so core models make room), takes its device choice and clears caches through it. ComfyUI is never imported here:
the module is only looked up in `sys.modules`.

The model cache (`load`) hands loaders' results back on later runs for the same file and options, so repeated runs
reuse the same objects instead of growing memory.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import sys
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from . import ops
from .dit import DiTConfig, WanDiT
from .errors import InputError
from .streaming import BlockStreamer, module_bytes, move_module, plan_resident_blocks
from .text import clean_prompt

log = logging.getLogger(__name__)

GiB = 2**30
RESIDENT, STREAMED, OFFLOADED = "resident", "streamed", "offloaded"
MIN_WORK_SCALE = 1 / 64  # OOM fallbacks stop halving a stage's working memory here

T = TypeVar("T")
Fallback = Callable[[], "str | None"]  # makes the footprint smaller and says how, or returns None if it cannot


@dataclass(frozen=True)
class MemoryOptions:
    """Settings of the manager; the defaults need no tuning.

    compute_device: where models run; None: ComfyUI's device inside ComfyUI, else the current CUDA device, else
        the CPU.
    offload_device: where idle weights and streamed blocks wait.
    budget_bytes: bytes the manager may place on the compute device, weights and planned activations together.
        None: automatic. On CUDA that is the free memory (`torch.cuda.mem_get_info` plus PyTorch's cached free
        blocks) plus what the manager already holds, minus `reserve_bytes`, and a budget set here can only lower
        it; on a CPU device there is no automatic limit, since moving weights to the host would save nothing.
    reserve_bytes: device memory the automatic budget leaves alone (library workspaces, allocator slack, other
        programs).
    cache_bytes: host memory the model cache may hold before it forgets its least recently used models; None:
        half the physical memory where the system reports it, else no limit.
    """

    compute_device: str | torch.device | None = None
    offload_device: str | torch.device = "cpu"
    budget_bytes: int | None = None
    reserve_bytes: int = GiB
    cache_bytes: int | None = None

    def __post_init__(self):
        for name in ("budget_bytes", "reserve_bytes", "cache_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InputError(f"memory option {name} must be a whole number of bytes >= 0, got {value!r}")


@dataclass(frozen=True)
class Placement:
    """Where a managed model is: the `device` it runs on, its `location` (resident, streamed or offloaded), how many
    of its repeated blocks are resident (None for a model without blocks), and its weight bytes on the compute
    device (streamed blocks in flight not included)."""

    device: torch.device
    location: str
    blocks_resident: int | None
    placed_bytes: int


# ------------------------------------------------------------------------------------------------------------------
# Activation estimates
# ------------------------------------------------------------------------------------------------------------------

def dit_activation_bytes(config: DiTConfig, *, batch: int, tokens: int, compute_dtype: torch.dtype,
                         per_token_timesteps: bool) -> int:
    """Peak bytes of the tensors one WanDiT forward keeps alive besides its weights (see `weight_workspace_bytes`).

    Derivation, following `sora.dit.WanBlock.forward` in inference (no autograd graph). Per token of the batch, with
    D = dim, F = ffn_dim, c = bytes per element of the compute dtype and float32 residuals (4 bytes):
      self-attention: the block input x, the modulated norm h (4D each); q, k, v in c (3cD); while RoPE rotates k,
        its float32 copy and the complex product (8D)                                              -> (16 + 3c)·D
        (during attention itself: x, h, q, k, v and the output: (8 + 5c)·D, never more for c <= 4)
      feed-forward: the block input held by the caller, the new residual x, h (12D), the hidden layer and its GELU
        (2cF)                                                                                      -> 12D + 2cF
        projecting back: 12D, the GELU output (cF), the projection (cD), its float32 copy and the new x (8D)
                                                                                                   -> 20D + cF + cD
      per-token timesteps (timestep [B, L]): shift, scale and gate become [B, L, D] float32        -> + 12D
      the RoPE table (complex64, head_dim/2 per token) and the caller's float32 latent             -> + 4·head_dim
                                                                                                      + 4·in_dim·patch
    Per sample: the embedded text context and the cross-attention keys and values, text_len·D·(4 + 4c) at most.
    Not included: the attention kernel's own workspace (flash / memory-efficient kernels need O(tokens); the math
    fallback would need batch·heads·tokens² more). `tests/test_memory_streaming.py` checks the estimate against
    the tensors actually alive during a forward.
    """
    D, F, c = config.dim, config.ffn_dim, torch.empty(0, dtype=compute_dtype).element_size()
    per_token = max((16 + 3 * c) * D, 12 * D + 2 * c * F, 20 * D + c * F + c * D)
    per_token += 12 * D if per_token_timesteps else 0
    per_token += 4 * config.head_dim + 4 * config.in_dim * math.prod(config.patch_size)
    per_sample = config.text_len * D * (4 + 4 * c)
    return batch * (tokens * per_token + per_sample)


def weight_workspace_bytes(model: nn.Module) -> int:
    """Bytes of the largest temporary weight copy a forward makes: `sora.ops.Linear` upcasts weights stored in another
    dtype (fp8, or bf16 in a float32 layer) for each call, and a scaled fp8 weight needs one more copy."""
    largest = 0
    for m in model.modules():
        if isinstance(m, ops.Linear):
            dtype = m.compute_dtype or torch.float32
            if m.weight.dtype != dtype:
                copies = 2 if m.scale_weight is not None else 1
                largest = max(largest, copies * m.weight.numel() * torch.empty(0, dtype=dtype).element_size())
    return largest


def dit_call_activation_bytes(model: WanDiT, args: tuple, kwargs: dict) -> int:
    """The activation estimate for one call `model(x, timestep, context)`."""
    x = args[0] if args else kwargs["x"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    samples = list(x) if isinstance(x, (list, tuple)) else list(x.unbind(0)) if x.ndim == 5 else [x]
    patch = math.prod(model.config.patch_size)
    tokens = max(s[0].numel() // patch for s in samples)  # per sample: T·H·W / patch
    per_token = torch.as_tensor(timestep).ndim == 2
    return (dit_activation_bytes(model.config, batch=len(samples), tokens=tokens, compute_dtype=model.compute_dtype,
                                 per_token_timesteps=per_token) + weight_workspace_bytes(model))


def _repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList of blocks named by the model's `_repeated_blocks` class attribute (None: not streamable)."""
    names = getattr(model, "_repeated_blocks", ())
    for child in model.children():
        if isinstance(child, nn.ModuleList) and len(child) and all(type(b).__name__ in names for b in child):
            return child
    return None


# ------------------------------------------------------------------------------------------------------------------
# ComfyUI
# ------------------------------------------------------------------------------------------------------------------

def _comfy():
    """ComfyUI's `comfy.model_management` when ComfyUI has loaded it, else None (never imported here)."""
    return sys.modules.get("comfy.model_management")


def _choose_device(requested: str | torch.device | None) -> torch.device:
    if requested is not None:
        return torch.device(requested)
    comfy = _comfy()
    if comfy is not None:
        return torch.device(comfy.get_torch_device())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


# ------------------------------------------------------------------------------------------------------------------
# The manager
# ------------------------------------------------------------------------------------------------------------------

class _Entry:
    """What the manager knows of one registered model (held by weak reference: the manager never keeps a model
    alive)."""

    def __init__(self, model: nn.Module, name: str):
        self.model = weakref.ref(model)
        self.name = name
        self.bytes = module_bytes(model)
        self.blocks = _repeated_blocks(model)
        self.block_bytes = [module_bytes(b) for b in self.blocks] if self.blocks is not None else []
        self.fixed_bytes = self.bytes - sum(self.block_bytes)
        self.estimate = dit_call_activation_bytes if isinstance(model, WanDiT) else None
        self.location = OFFLOADED
        self.resident_blocks: int | None = None
        self.placed = 0  # bytes of weights on the compute device (streamed blocks in flight not included)
        self.users = 0
        self.last_used = 0
        self.override: int | None = None  # blocks resident chosen by the user
        self.cap: int | None = None  # most blocks resident after out-of-memory errors
        self.replan = False  # settings changed: choose the placement afresh at the next use
        self.warned = False  # told the user once that even full streaming exceeds the budget
        self.on_move: Callable[[torch.device], None] | None = None
        self.streamer: BlockStreamer | None = None
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.call_devices: list[torch.device | None] = []  # input devices of the forwards in progress


class MemoryManager:
    """Budget, registry, placement, eviction, out-of-memory recovery and the model cache (see the module docstring).
    """

    def __init__(self, options: MemoryOptions | None = None):
        self.options = options or MemoryOptions()
        self.compute_device = _choose_device(self.options.compute_device)
        self.offload_device = torch.device(self.options.offload_device)
        self._entries: dict[int, _Entry] = {}
        self._clock = itertools.count(1)
        self._placed = 0
        self._peak = 0
        self._attempts: list[set[int]] = []  # models used by each `retry_on_oom` attempt in progress
        self._work_scale: dict[str, float] = {}  # per purpose of `budget_for`, halved by out-of-memory errors
        self._cache: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()  # key -> (file identity, object)

    def configure(self, *, budget_bytes: int | None = None, reserve_bytes: int | None = None,
                  cache_bytes: int | None = None) -> None:
        """Change the budget (None: automatic), the reserve (None: keep) or the cache limit (None: keep). A change
        re-plans every model at its next use and forgets the smaller footprints out-of-memory errors had forced."""
        changes = {"budget_bytes": budget_bytes}
        if reserve_bytes is not None:
            changes["reserve_bytes"] = reserve_bytes
        if cache_bytes is not None:
            changes["cache_bytes"] = cache_bytes
        options = replace(self.options, **changes)
        if options == self.options:
            return  # nothing changed: keep the plans and what out-of-memory errors taught
        self.options = options
        self._work_scale.clear()
        for entry in self._entries.values():
            entry.cap, entry.replan, entry.warned = None, True, False

    # -- budget and ledger -----------------------------------------------------------------------------------------

    def budget(self) -> int | None:
        """Bytes the manager may place on the compute device now; None when there is no limit."""
        user = self.options.budget_bytes
        if self.compute_device.type != "cuda":
            return user
        free, _ = torch.cuda.mem_get_info(self.compute_device)
        cached = torch.cuda.memory_reserved(self.compute_device) - torch.cuda.memory_allocated(self.compute_device)
        automatic = max(0, free + cached + self._placed - self.options.reserve_bytes)
        return automatic if user is None else min(user, automatic)

    @property
    def placed_bytes(self) -> int:
        """Bytes of weights the manager has on the compute device now, streamed blocks in flight included."""
        return self._placed

    @property
    def peak_placed_bytes(self) -> int:
        """The most `placed_bytes` has been since the manager started or `reset_peak`."""
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self._placed

    def _account(self, delta: int) -> None:
        self._placed += delta
        self._peak = max(self._peak, self._placed)

    def _free_for(self, entry: _Entry | None) -> int | None:
        """Bytes `entry` could occupy now: the budget less what other models hold (None: no limit)."""
        budget = self.budget()
        if budget is None:
            return None
        return budget - self._placed + (entry.placed if entry is not None else 0)

    # -- registry --------------------------------------------------------------------------------------------------

    def register(self, model: nn.Module, *, name: str | None = None,
                 on_move: Callable[[torch.device], None] | None = None) -> None:
        """Manage `model`; calling it again only updates the name or `on_move`.

        on_move: called with the device the model runs on after each move (text encoders follow their weights).
        A model with repeated blocks (the DiT) gets forward hooks: each call is placed and planned from its own
        input size, inputs are moved to the compute device and the output back to the input's device. A managed
        model must not be moved by anyone else (`model.to`), or the ledger no longer matches the device.
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"the memory manager manages torch modules, got {type(model).__name__}")
        entry = self._entries.get(id(model))
        if entry is None or entry.model() is not model:
            entry = self._add(model, name or type(model).__name__)
        if name is not None:
            entry.name = name
        if on_move is not None:
            entry.on_move = on_move

    def set_blocks_resident(self, model: nn.Module, blocks: int | None) -> None:
        """The expert override for a model with repeated blocks: keep `blocks` of them on the compute device and
        stream the rest, whatever the budget says; None returns to the automatic choice. A new value applies at the
        next use; setting the same value again changes nothing.
        """
        self.register(model)
        entry = self._entries[id(model)]
        if blocks is not None and (entry.blocks is None or not 0 <= blocks <= len(entry.blocks)):
            limit = f"0..{len(entry.blocks)}" if entry.blocks is not None else "none: it has no repeated blocks"
            raise InputError(f"blocks resident {blocks} is out of range for {entry.name} ({limit}); "
                             "use a number in that range, or automatic")
        if blocks != entry.override:
            entry.override, entry.cap, entry.replan = blocks, None, True

    def _add(self, model: nn.Module, name: str) -> _Entry:
        entry = _Entry(model, name)
        key = id(model)
        self._entries[key] = entry
        weakref.finalize(model, self._forget, key, entry)
        device = _device_of(model, self.offload_device)
        if device == self.compute_device and device != self.offload_device:
            entry.location, entry.placed = RESIDENT, entry.bytes
            entry.resident_blocks = len(entry.blocks) if entry.blocks is not None else None
            self._account(entry.bytes)
        if entry.blocks is not None:
            entry.hooks = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                           model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True)]
        return entry

    def _forget(self, key: int, entry: _Entry) -> None:
        """A registered model was garbage-collected: its memory is gone, drop it from the ledger."""
        if self._entries.get(key) is entry:
            del self._entries[key]
        in_flight = entry.streamer.live_bytes() if entry.streamer is not None else 0
        self._account(-entry.placed - in_flight)

    def unregister(self, model: nn.Module) -> None:
        """Stop managing `model`: it goes to the offload device with ordinary tensors and loses its hooks."""
        entry = self._entries.pop(id(model), None)
        if entry is None or entry.model() is not model:
            return
        self._move(entry, OFFLOADED, None)
        for handle in entry.hooks:
            handle.remove()

    def close(self) -> None:
        """Unregister every model (before replacing the process's manager)."""
        for entry in list(self._entries.values()):
            model = entry.model()
            if model is not None:
                self.unregister(model)

    def state(self, model: nn.Module) -> Placement:
        """Where a registered model is now."""
        entry = self._entry(model)
        device = self.offload_device if entry.location == OFFLOADED else self.compute_device
        return Placement(device, entry.location, entry.resident_blocks, entry.placed)

    def _entry(self, model: nn.Module) -> _Entry:
        entry = self._entries.get(id(model))
        if entry is None or entry.model() is not model:
            raise InputError(f"{type(model).__name__} is not registered with the memory manager; register it first")
        return entry

    # -- using a model ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, model: nn.Module, *, activation_bytes: int = 0) -> Iterator[Placement]:
        """Make `model` ready to run inside the `with` block and yield its `Placement` (run it on `.device`).

        activation_bytes: working memory the caller will need beside the weights; room is made for it. A model in
        use is never evicted. Registers the model if needed.
        """
        self.register(model)
        entry = self._entries[id(model)]
        self._enter(entry, activation_bytes)
        try:
            yield self.state(model)
        finally:
            self._exit(entry)

    def _enter(self, entry: _Entry, activation: int) -> None:
        entry.users += 1
        entry.last_used = next(self._clock)
        for attempt in self._attempts:
            attempt.add(id(entry.model()))
        try:
            self._place(entry, activation)
        except BaseException:
            entry.users -= 1
            raise

    def _exit(self, entry: _Entry) -> None:
        entry.users -= 1
        entry.last_used = next(self._clock)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        entry = self._entries[id(module)]
        self._enter(entry, entry.estimate(module, args, kwargs) if entry.estimate is not None else 0)
        source = _first_device((args, kwargs))
        entry.call_devices.append(source)
        if source is not None and source != self.compute_device:
            return _to_device(args, self.compute_device), _to_device(kwargs, self.compute_device)
        return None

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        entry = self._entries.get(id(module))
        if entry is None or not entry.call_devices:  # the pre-hook failed before the call was counted
            return None
        source = entry.call_devices.pop()
        self._exit(entry)
        if output is not None and source is not None and source != self.compute_device:
            return _to_device(output, source)
        return None

    def _place(self, entry: _Entry, activation: int) -> None:
        """Choose the placement of `entry` for a call needing `activation` bytes, make room, move it.

        A streamed model keeps its plan while that still fits (re-planning moves blocks back and forth); it gets a
        fresh plan after it was offloaded or its settings changed.
        """
        free = self._free_for(entry)
        if free is not None and free < entry.bytes + activation:
            self._ask_comfy_for(entry.bytes - entry.placed + activation)
            free = self._free_for(entry)
        others = self._evictable(exclude={id(entry.model())})
        available = None if free is None else free + sum(e.placed for e in others)
        location, resident = self._target(entry, activation, available)
        keep = location == entry.location and not entry.replan and (
            location != STREAMED or resident >= entry.resident_blocks)
        entry.replan = False
        if keep:
            location, resident = entry.location, entry.resident_blocks
        needed = self._footprint(entry, location, resident) + activation
        for other in others:
            free = self._free_for(entry)
            if free is None or free >= needed:
                break
            self._move(other, OFFLOADED, None)
        if not keep:
            self._move(entry, location, resident)

    def _target(self, entry: _Entry, activation: int, available: int | None) -> tuple[str, int | None]:
        """The placement that fits `available` bytes (None: no limit) with `activation` bytes of working memory."""
        fits = available is None or entry.bytes + activation <= available
        if entry.blocks is None:
            return (RESIDENT, None) if fits else (OFFLOADED, None)
        count = len(entry.blocks)
        if entry.override is not None:
            resident = entry.override
        elif fits:
            resident = count
        else:
            resident = plan_resident_blocks(available - activation, entry.fixed_bytes, entry.block_bytes)
            if resident == 0 and self._footprint(entry, STREAMED, 0) + activation > available and not entry.warned:
                entry.warned = True
                log.warning("%s does not fit the memory budget even with every block streamed (%.2f GiB needed, "
                            "%.2f GiB available); trying anyway", entry.name,
                            (self._footprint(entry, STREAMED, 0) + activation) / GiB, available / GiB)
        if entry.cap is not None:
            resident = min(resident, entry.cap)
        return (RESIDENT, count) if resident == count else (STREAMED, resident)

    def _footprint(self, entry: _Entry, location: str, resident: int | None) -> int:
        """Peak weight bytes on the compute device of a placement, with the streaming window (two blocks)."""
        if location == OFFLOADED:
            return 0
        if location == RESIDENT:
            return entry.bytes
        window = sorted(entry.block_bytes[resident:], reverse=True)[:2]
        return entry.fixed_bytes + sum(entry.block_bytes[:resident]) + sum(window)

    def _move(self, entry: _Entry, location: str, resident: int | None) -> None:
        """Put `entry`'s weights where `location` says; on an out-of-memory error it ends up offloaded."""
        model = entry.model()
        try:
            self._apply(entry, model, location, resident)
        except torch.OutOfMemoryError:
            self._apply(entry, model, OFFLOADED, None)
            raise
        finally:
            if entry.on_move is not None:
                entry.on_move(self.offload_device if entry.location == OFFLOADED else self.compute_device)

    def _apply(self, entry: _Entry, model: nn.Module, location: str, resident: int | None) -> None:
        if entry.streamer is not None:
            entry.streamer.detach(self.compute_device if location == RESIDENT else self.offload_device)
            entry.streamer = None
        if location == STREAMED:
            move_module(model, self.compute_device, skip=list(entry.blocks))
            entry.streamer = BlockStreamer(entry.blocks, resident, self.compute_device, self._account)
            entry.streamer.attach()
            placed = entry.fixed_bytes + sum(entry.block_bytes[:resident])
        else:
            model.to(self.compute_device if location == RESIDENT else self.offload_device)
            placed = entry.bytes if location == RESIDENT else 0
        self._account(placed - entry.placed)
        entry.location, entry.placed = location, placed
        if entry.blocks is None or location == OFFLOADED:
            entry.resident_blocks = None
        else:
            entry.resident_blocks = len(entry.blocks) if location == RESIDENT else resident

    # -- making room -----------------------------------------------------------------------------------------------

    def _evictable(self, exclude: set[int] = frozenset()) -> list[_Entry]:
        """Idle models holding device memory, least recently used first."""
        idle = [e for key, e in self._entries.items()
                if key not in exclude and e.users == 0 and e.placed > 0 and e.model() is not None]
        return sorted(idle, key=lambda e: e.last_used)

    def evict_idle(self, exclude: set[int] = frozenset()) -> int:
        """Move every idle model (except the ids in `exclude`) to the offload device; returns the bytes freed."""
        freed = 0
        for entry in self._evictable(exclude):
            freed += entry.placed
            self._move(entry, OFFLOADED, None)
        return freed

    def budget_for(self, purpose: str, wanted: int | None = None) -> int | None:
        """Working memory (bytes) a stage may use on the compute device now, e.g. `budget_for("vae_decode")` for the
        VAE's tile size; None when there is no limit.

        wanted: the bytes that would let the stage run in one piece; idle models leave (least recently used first)
        until that much is free or none is left. Out-of-memory errors in the stage shrink later answers for the
        same `purpose` (see `smaller_work`).
        """
        free = self._free_for(None)
        if wanted is not None and free is not None and free < wanted:
            self._ask_comfy_for(wanted - free)
            for entry in self._evictable():
                free = self._free_for(None)
                if free is None or free >= wanted:
                    break
                self._move(entry, OFFLOADED, None)
        free = self._free_for(None)
        if free is None:
            return None
        return max(0, int(free * self._work_scale.get(purpose, 1.0)))

    def smaller_work(self, purpose: str) -> Fallback:
        """An out-of-memory fallback that halves the working memory `budget_for(purpose)` hands out."""
        def halve() -> str | None:
            scale = self._work_scale.get(purpose, 1.0)
            if self.budget() is None or scale / 2 < MIN_WORK_SCALE:
                return None
            self._work_scale[purpose] = scale / 2
            return f"halving the working memory of {purpose}"
        return halve

    def _ask_comfy_for(self, nbytes: int) -> None:
        """Inside ComfyUI, before placing `nbytes` more: let ComfyUI unload its own models to make room."""
        comfy = _comfy()
        if comfy is not None and nbytes > 0:
            comfy.free_memory(nbytes + self.options.reserve_bytes, self.compute_device)

    def release(self) -> None:
        """Return freed memory: collect garbage and empty the allocator's cache (through ComfyUI inside it)."""
        gc.collect()
        comfy = _comfy()
        if comfy is not None:
            comfy.soft_empty_cache()
        elif self.compute_device.type == "cuda":
            torch.cuda.empty_cache()

    # -- out-of-memory recovery ------------------------------------------------------------------------------------

    def retry_on_oom(self, step: Callable[[], T], *fallbacks: Fallback, what: str = "step") -> T:
        """Run `step()`; after a `torch.OutOfMemoryError`, release memory, take a smaller footprint and run it again.

        Smaller footprints, cheapest first: idle models the failed attempt did not use leave the device; then the
        caller's `fallbacks` in order (each returns a description of what it changed, or None if it cannot change
        anything, e.g. `sequential_guidance`, `smaller_work`); then the streamable models the attempt used keep half
        as many blocks resident. When nothing is left to shrink, the error propagates.
        """
        while True:
            used: set[int] = set()
            self._attempts.append(used)
            try:
                return step()
            except torch.OutOfMemoryError as error:
                traceback.clear_frames(error.__traceback__)  # the failed attempt's activations go now
                change = self._smaller_footprint(used, fallbacks)
                if change is None:
                    raise
                log.warning("out of memory in %s (%s); retrying after %s", what, str(error).split("\n")[0], change)
            finally:
                self._attempts.pop()
            self.release()

    def _smaller_footprint(self, used: set[int], fallbacks: tuple[Fallback, ...]) -> str | None:
        freed = self.evict_idle(exclude=used)
        if freed:
            return f"moving idle models ({freed / GiB:.2f} GiB) to {self.offload_device}"
        for fallback in fallbacks:
            change = fallback()
            if change is not None:
                return change
        changes = []
        for key in used:
            entry = self._entries.get(key)
            if entry is None or entry.blocks is None:
                continue
            if entry.location != OFFLOADED:
                current = entry.resident_blocks
            else:  # placing it failed: its next plan gets the smaller cap
                current = len(entry.blocks) if entry.cap is None else entry.cap
            if current == 0:
                continue
            entry.cap = current // 2
            if entry.location != OFFLOADED:
                self._move(entry, STREAMED, entry.cap)
            changes.append(f"streaming more of {entry.name} ({entry.cap} of {len(entry.blocks)} blocks resident)")
        return "; ".join(changes) or None

    # -- model cache -----------------------------------------------------------------------------------------------

    def load(self, loader: Callable[..., T], path: str | Path, **options) -> T:
        """`loader(path, **options)`, or what it returned before for the same loader, file and options while the
        file is unchanged (same size and modification time), so repeated runs reuse one object.

        Torch modules that come back are registered. The cache forgets its least recently used objects when it holds
        more than `MemoryOptions.cache_bytes` of host memory (the one just loaded always stays).
        """
        path = Path(path)
        if not path.exists():
            return loader(path, **options)  # the loader's own error says what is missing
        key = (f"{loader.__module__}.{loader.__qualname__}", str(path.resolve()), tuple(sorted(options.items())))
        try:
            hash(key)
        except TypeError:
            raise InputError(f"loader options must be plain values (numbers, strings, dtypes); got {options}") from None
        identity = _file_identity(path)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == identity:
            self._cache.move_to_end(key)
            return cached[1]
        self._cache.pop(key, None)  # a changed file: drop the old object before loading the new one
        loaded = loader(path, **options)
        if isinstance(loaded, nn.Module):
            self.register(loaded, name=path.name)
        self._cache[key] = (identity, loaded)
        self._trim_cache()
        return loaded

    def clear_cache(self) -> None:
        """Forget every cached model (they are freed once nothing else holds them)."""
        self._cache.clear()

    def _trim_cache(self) -> None:
        limit = self.options.cache_bytes
        if limit is None:
            physical = _physical_memory()
            limit = None if physical is None else physical // 2
        if limit is None:
            return
        while len(self._cache) > 1 and sum(_host_bytes(obj) for _, obj in self._cache.values()) > limit:
            self._cache.popitem(last=False)


# ------------------------------------------------------------------------------------------------------------------
# The process's manager
# ------------------------------------------------------------------------------------------------------------------

_manager: MemoryManager | None = None


def get_manager() -> MemoryManager:
    """The manager shared by the whole process (made on first use, so that ComfyUI's device choice is known)."""
    global _manager
    if _manager is None:
        _manager = MemoryManager()
    return _manager


def set_manager(manager: MemoryManager) -> MemoryManager | None:
    """Make `manager` the process's manager; returns the previous one (close it if it managed models)."""
    global _manager
    previous, _manager = _manager, manager
    return previous


# ------------------------------------------------------------------------------------------------------------------
# Stages under the manager
# ------------------------------------------------------------------------------------------------------------------

def sequential_guidance(guidance) -> str | None:
    """Out-of-memory fallback for a `sora.guidance.ClassifierFreeGuidance`: run the conditional and unconditional
    passes as two forwards (half the activations, the same result). None when they already are."""
    if guidance.negative is None or not guidance.batched:
        return None
    guidance.batched = False
    return "running guidance as two forwards"


def encode_text(encoder, prompts: list[str], *, manager: MemoryManager | None = None) -> tuple[torch.Tensor, ...]:
    """`encoder.encode(prompts)` with the encoder's model placed by the manager: on the compute device when it fits
    the budget (idle models leave for it), else it runs in host memory. Cached prompts need no model at all.

    encoder: a `sora.text.TextEncoder`; its `device` follows the manager's placement from now on.
    """
    manager = manager or get_manager()
    if all(encoder.cache.get((encoder.identity, clean_prompt(p))) is not None for p in prompts):
        return encoder.encode(prompts)
    if not encoder.loaded:
        encoder.device = manager.offload_device  # load into host memory; the manager moves it from there
    model = encoder.model
    manager.register(model, name=encoder.name, on_move=_follower(encoder))
    # Working memory: about sixteen float32 vectors of the model width per token covers attention and FFN.
    activation = len(prompts) * encoder.max_length * encoder.dim * 64
    with manager.use(model, activation_bytes=activation):
        return encoder.encode(prompts)


def decode_video(vae, latent: torch.Tensor, *, manager: MemoryManager | None = None,
                 callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`vae.decode(latent)` with the VAE placed by the manager and its tile size chosen from the budget
    (`budget_for("vae_decode")`); an out-of-memory error retries with half the working memory (smaller tiles)."""
    vae.check_latent(latent)
    B, _, _, h, w = latent.shape
    return _run_vae(vae, "vae_decode", vae.decode, latent, h, w, B, False, manager, callback)


def encode_video(vae, video: torch.Tensor, *, manager: MemoryManager | None = None,
                 callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`vae.encode(video)` placed and tiled like `decode_video` (`budget_for("vae_encode")`)."""
    vae.check_video(video)
    s = vae.config.spatial_factor
    B, _, _, H, W = video.shape
    return _run_vae(vae, "vae_encode", vae.encode, video, H // s, W // s, B, True, manager, callback)


def _run_vae(vae, purpose: str, run: Callable, data: torch.Tensor, h: int, w: int, batch: int, encode: bool,
             manager: MemoryManager | None, callback) -> torch.Tensor:
    manager = manager or get_manager()
    whole = vae.working_bytes(h, w, batch=batch, encode=encode)
    tiles = vae.plan_tiling(h, w, 0, batch=batch, encode=encode)  # the smallest tiles the VAE would use
    smallest = vae.working_bytes(tiles.height, tiles.width, batch=batch, encode=encode)
    with manager.use(vae, activation_bytes=smallest) as placement:
        def step() -> torch.Tensor:
            budget = manager.budget_for(purpose, wanted=whole) if placement.device == manager.compute_device else None
            return run(data, memory_budget=budget, callback=callback)
        return manager.retry_on_oom(step, manager.smaller_work(purpose), what=purpose.replace("_", " "))


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------

def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return default


def _first_device(obj) -> torch.device | None:
    """The device of the first tensor in nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for value in values:
        device = _first_device(value)
        if device is not None:
            return device
    return None


def _to_device(obj, device: torch.device):
    """Tensors in nested tuples, lists and dicts moved to `device`; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _follower(encoder) -> Callable[[torch.device], None]:
    """Keeps `encoder.device` on its model's device, without keeping the encoder alive."""
    ref = weakref.ref(encoder)

    def follow(device: torch.device) -> None:
        target = ref()
        if target is not None:
            target.device = device
    return follow


def _file_identity(path: Path) -> tuple:
    """(name, size, modification time) of a file, or of every file in a folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])


def _host_bytes(obj) -> int:
    """Weight bytes of a cached object: a module, or the modules among an object's attributes (a text encoder)."""
    if isinstance(obj, nn.Module):
        return module_bytes(obj)
    return sum(module_bytes(v) for v in getattr(obj, "__dict__", {}).values() if isinstance(v, nn.Module))
