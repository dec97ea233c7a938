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
bytes of activations a call needs are planned too: a model that describes its own working memory (a method
`activation_bytes(args, kwargs)`, as `sora.dit.WanDiT` has) is planned per call from its input, and stages with a
tile size choose it from the room left (`budget_for`). A model with repeated blocks names their class in
`_repeated_blocks`. The manager is the only owner of a managed model's device: nothing else moves it.

A run may bring its own limits: `use(model, budget_bytes=..., blocks_resident=...)` holds for the `with` block
only and leaves what out-of-memory errors have taught the manager in place.

Out of memory (`retry_on_oom`): the failed step's tensors are released and the step runs again with a smaller
footprint: idle models leave, then the caller's own fallbacks (sequential guidance, smaller VAE tiles), then
fewer resident blocks.

Inside ComfyUI (its `comfy.model_management` is loaded) the manager asks it to free memory before placing weights
(so core models make room), takes its device choice and clears caches through it. ComfyUI is never imported here:
the module is only looked up in `sys.modules`.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import sys
import traceback
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import nn

from .errors import InputError
from .streaming import BlockStreamer, module_bytes, move_module, plan_resident_blocks

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
    """

    compute_device: str | torch.device | None = None
    offload_device: str | torch.device = "cpu"
    budget_bytes: int | None = None
    reserve_bytes: int = GiB

    def __post_init__(self):
        for name in ("budget_bytes", "reserve_bytes"):
            check_bytes(name, getattr(self, name))


def check_bytes(name: str, value) -> None:
    """Raise InputError unless `value` is None or a whole number of bytes >= 0."""
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
        # the class's method, not the bound one: the entry must not keep the model alive
        self.estimate: Callable[[nn.Module, tuple, dict], int] | None = getattr(type(model), "activation_bytes", None)
        self.location = OFFLOADED
        self.resident_blocks: int | None = None
        self.placed = 0  # bytes of weights on the compute device (streamed blocks in flight not included)
        self.users = 0
        self.last_used = 0
        self.override: int | None = None  # blocks resident chosen by the user
        self.cap: int | None = None  # most blocks resident after out-of-memory errors
        self.replan = False  # settings changed: choose the placement afresh at the next use
        self.warned = False  # told the user once that even full streaming exceeds the budget
        self.streamer: BlockStreamer | None = None
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.call_devices: list[torch.device | None] = []  # input devices of the forwards in progress


class MemoryManager:
    """Budget, registry, placement, eviction and out-of-memory recovery (see the module docstring)."""

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
        self._run_budgets: list[int] = []  # the budgets of the `use(..., budget_bytes=...)` blocks in progress

    def configure(self, *, budget_bytes: int | None = None, reserve_bytes: int | None = None) -> None:
        """Change the process-wide budget (None: automatic) or the reserve (None: keep). A change re-plans every model
        at its next use and forgets the smaller footprints out-of-memory errors had forced. A budget for one run
        is `use(..., budget_bytes=...)` instead."""
        changes = {"budget_bytes": budget_bytes}
        if reserve_bytes is not None:
            changes["reserve_bytes"] = reserve_bytes
        options = replace(self.options, **changes)
        if options == self.options:
            return  # nothing changed: keep the plans and what out-of-memory errors taught
        self.options = options
        self._work_scale.clear()
        for entry in self._entries.values():
            entry.cap, entry.replan, entry.warned = None, True, False

    # -- budget and ledger -----------------------------------------------------------------------------------------

    def budget(self) -> int | None:
        """Bytes the manager may place on the compute device now; None when there is no limit. The process-wide
        budget, the budgets of the runs in progress and, on CUDA, the free memory all bound it."""
        limits = [b for b in (self.options.budget_bytes, *self._run_budgets) if b is not None]
        if self.compute_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.compute_device)
            cached = torch.cuda.memory_reserved(self.compute_device) - torch.cuda.memory_allocated(self.compute_device)
            limits.append(max(0, free + cached + self._placed - self.options.reserve_bytes))
        return min(limits, default=None)

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

    def register(self, model: nn.Module, *, name: str | None = None) -> None:
        """Manage `model`; calling it again only updates the name.

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

    def _set_blocks_resident(self, entry: _Entry, blocks: int | None) -> None:
        """The expert override of a model with repeated blocks: keep `blocks` of them on the compute device and
        stream the rest, whatever the budget says; None returns to the automatic choice. A new value applies at
        the next placement and forgets the cap out-of-memory errors set; the same value again changes nothing."""
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
    def use(self, model: nn.Module, *, activation_bytes: int = 0, budget_bytes: int | None = None,
            blocks_resident: int | None | object = ...) -> Iterator[Placement]:
        """Make `model` ready to run inside the `with` block and yield its `Placement` (run it on `.device`).

        activation_bytes: working memory the caller will need beside the weights; room is made for it.
        budget_bytes: a budget for this block only (the lower of it and the process-wide one applies), e.g. Sora
            Memory Options' budget for one sampling run; it teaches and forgets nothing.
        blocks_resident: for a model with repeated blocks, how many stay on the device (None: automatic); left
            out, the model keeps the last value it was given.
        A model in use is never evicted. Registers the model if needed.
        """
        self.register(model)
        entry = self._entries[id(model)]
        check_bytes("budget_bytes", budget_bytes)
        if blocks_resident is not ...:
            self._set_blocks_resident(entry, blocks_resident)
        if budget_bytes is not None:
            self._run_budgets.append(budget_bytes)
        try:
            self._enter(entry, activation_bytes)
            try:
                yield self.state(model)
            finally:
                self._exit(entry)
        finally:
            if budget_bytes is not None:
                self._run_budgets.remove(budget_bytes)

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
