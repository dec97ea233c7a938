"""Block streaming: run a transformer whose repeated blocks do not all fit on the compute device.

The first `resident` blocks live on the compute device. The weights of the others live in an offload store in
host memory (pinned on CUDA, so copies are asynchronous) and are copied into their block just before its forward
and dropped right after it; while a block runs, the next streamed block is already being copied (on CUDA, on a
side stream). At most two streamed blocks are on the device at once: the running one and the prefetched one.

On a CPU compute device the same path runs with real copies (the store keeps the weights, each forward gets a
fresh copy), so it can be tested and its bytes counted without an accelerator. Streaming never changes results:
a block computes on a bit-exact copy of its own weights.

Hooks do the work (`nn.Module.register_forward_pre_hook`), so the model's own loop `for block in self.blocks:`
stays as it is. The CUDA side of the copies (pinning, the side stream, its events) is one small class,
`SideStreamCopies`, chosen by `side_stream_copies(device)`; tests replace that function to run the CUDA order of
operations on the CPU. While streaming is attached a streamed block holds meta-device placeholders between forwards;
`detach` puts real tensors back.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Slot = tuple[nn.Module, str, bool]  # (module owning the tensor, attribute name, is a parameter)


def tensor_slots(module: nn.Module) -> list[Slot]:
    """Every parameter and buffer of `module` and its children, as (owner, name, is_parameter)."""
    slots = []
    for owner in module.modules():
        slots += [(owner, name, True) for name, p in owner._parameters.items() if p is not None]
        slots += [(owner, name, False) for name, b in owner._buffers.items() if b is not None]
    return slots


def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of `module` (shared tensors counted once)."""
    seen, total = set(), 0
    for owner, name, _ in tensor_slots(module):
        tensor = getattr(owner, name)
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def set_slot(slot: Slot, tensor: torch.Tensor) -> None:
    owner, name, is_parameter = slot
    setattr(owner, name, nn.Parameter(tensor, requires_grad=False) if is_parameter else tensor)


def move_module(module: nn.Module, device: torch.device, skip: Sequence[nn.Module] = ()) -> None:
    """Move the tensors of `module` to `device`, leaving the modules in `skip` (and their children) alone.

    Unlike `module.to(device)` this works on a model whose streamed blocks hold meta placeholders.
    """
    skipped = {id(m) for s in skip for m in s.modules()}
    for owner in module.modules():
        if id(owner) in skipped:
            continue
        for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None and tensor.device != device:
                set_slot((owner, name, name in owner._parameters), tensor.detach().to(device))


class SideStreamCopies:
    """How streamed blocks reach a CUDA device: page-locked host tensors copied on a side stream, so that the copy
    of the next block overlaps this block's compute; the compute stream waits for a block's copy before using it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()  # page-locked: the copy to the device can run asynchronously

    def copy(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Device copies of `tensors`, started on the side stream, and the event that marks their end."""
        with torch.cuda.stream(self.stream):
            copies = [tensor.to(self.device, non_blocking=True) for tensor in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def wait(self, event: torch.cuda.Event) -> None:
        """Make the compute stream wait for a copy before it uses it."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def release(self, copy: torch.Tensor) -> None:
        """A copy is dropped: allocated on the side stream, used on the compute stream, its memory must not be
        reused before that use ends."""
        copy.record_stream(torch.cuda.current_stream(self.device))


def side_stream_copies(device: torch.device) -> SideStreamCopies | None:
    """The copier of streamed blocks for `device`: a side stream on CUDA, None elsewhere (plain clones)."""
    return SideStreamCopies(device) if device.type == "cuda" else None


def plan_resident_blocks(available: int, fixed: int, block_bytes: Sequence[int]) -> int:
    """The most blocks that can stay resident when `available` bytes must hold the model's `fixed` part, the
    resident blocks and the streaming window (the running and the prefetched block). 0 when even that fails."""
    count = len(block_bytes)
    for resident in range(count, 0, -1):
        window = sorted(block_bytes[resident:], reverse=True)[:2]
        if fixed + sum(block_bytes[:resident]) + sum(window) <= available:
            return resident
    return 0


class BlockStreamer:
    """Keeps `blocks[:resident]` on `device` and streams the rest from an offload store in host memory.

    `account(delta)` is told of every byte placed on (+) or released from (-) `device` by streaming, so the
    memory manager's ledger includes the blocks in flight. Call `attach` once, then run the model as usual;
    `detach(to)` ends streaming with every block's weights on `to`.
    """

    def __init__(self, blocks: Sequence[nn.Module], resident: int, device: torch.device,
                 account: Callable[[int], None]):
        self.blocks = list(blocks)
        self.resident = max(0, min(resident, len(self.blocks)))
        self.device = device
        self.account = account
        self.streamed = list(range(self.resident, len(self.blocks)))
        self.store: dict[int, list[tuple[Slot, torch.Tensor]]] = {}  # block index -> its slots and host tensors
        self.sizes: dict[int, int] = {}  # block index -> bytes of its weights
        self.live: dict[int, torch.cuda.Event | None] = {}  # materialised streamed blocks -> copy-done event
        self.copies = side_stream_copies(device)
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def live_bytes(self) -> int:
        """Bytes of streamed blocks on the device now."""
        return sum(self.sizes[index] for index in self.live)

    def attach(self) -> None:
        for block in self.blocks[:self.resident]:
            move_module(block, self.device)
        for index in self.streamed:
            entries = self.store[index] = []  # filled as we go, so that `detach` can undo a failed attach
            for slot in tensor_slots(self.blocks[index]):
                tensor = getattr(slot[0], slot[1]).detach().to("cpu")
                if self.copies is not None:
                    tensor = self.copies.pin(tensor)
                entries.append((slot, tensor))
                set_slot(slot, torch.empty_like(tensor, device="meta"))
            self.sizes[index] = sum(t.numel() * t.element_size() for _, t in entries)
        for position, block in enumerate(self.blocks):
            if position in self.store or position + 1 in self.store:
                self.hooks.append(block.register_forward_pre_hook(self._before(position)))
            if position in self.store:
                self.hooks.append(block.register_forward_hook(self._after(position), always_call=True))

    def detach(self, to: torch.device) -> None:
        """Stop streaming: every streamed block gets its weights back as ordinary tensors on `to`."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        for index in list(self.live):
            self._release(index)
        for entries in self.store.values():
            for slot, tensor in entries:
                set_slot(slot, tensor.to(to))
        self.store.clear()
        self.sizes.clear()
        for block in self.blocks[:self.resident]:
            move_module(block, to)

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _before(self, position: int):
        def hook(module, args):
            if position in self.store:
                if position not in self.live:
                    self._fetch(position)
                event = self.live[position]
                if event is not None:
                    self.copies.wait(event)
            following = position + 1
            if following in self.store and following not in self.live:
                self._fetch(following)  # prefetch: overlaps this block's compute on CUDA
        return hook

    def _after(self, position: int):
        def hook(module, args, output):
            if position in self.live:
                self._release(position)
        return hook

    def _fetch(self, index: int) -> None:
        """Copy block `index` from the store onto the device and install the copies (async on CUDA)."""
        entries = self.store[index]
        if self.copies is None:
            copies = [tensor.clone() for _, tensor in entries]
            event = None
        else:
            copies, event = self.copies.copy([tensor for _, tensor in entries])
        for (slot, _), copy in zip(entries, copies):
            set_slot(slot, copy)
        self.live[index] = event
        self.account(self.sizes[index])

    def _release(self, index: int) -> None:
        """Drop the device copies of block `index`, putting placeholders back."""
        del self.live[index]
        for slot, tensor in self.store[index]:
            if self.copies is not None:
                self.copies.release(getattr(slot[0], slot[1]))
            set_slot(slot, torch.empty_like(tensor, device="meta"))
        self.account(-self.sizes[index])
