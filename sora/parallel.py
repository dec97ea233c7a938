"""One DiT call computed by a group of processes, one per device, on torch.distributed (gloo on the CPU, NCCL on
CUDA).

A call splits two ways, combined when it allows both (ECOSYSTEM_FACTS §7):

- The token sequence (sequence parallelism). Each process holds 1/P of the tokens, the sequence zero-padded to
  split evenly, with its slice of the RoPE table (padding rotated by identity) and of per-token timesteps.
  Self-attention needs every token: when the head count divides the group, an all-to-all (Ulysses, as Wan's own
  scripts and xDiT do) gives each process all tokens of H/P heads and a second one gives the result back;
  otherwise each process gathers the keys and values of all tokens and attends its own queries to them. Padding
  keys are masked. Cross-attention, the feed-forward layers and the head work per token and run locally; the
  output is gathered once per forward (`SequenceShard`, through `sora.dit.WanDiT.forward(sequence=...)`).
- The guidance passes (CFG parallelism). A batched guided call arrives as one batch of n passes
  (`ModelCall.passes`, e.g. ("cond", "uncond")). With c = gcd(n, P), the group splits into c subgroups of P/c
  processes; each runs n/c of the passes (splitting their sequence among its members) and the outputs are
  gathered, so the guider combines them once per step exactly as in one process.

Every process calls `Ranks.forward` with the same inputs and gets the whole output (SPMD). How the processes are
started and fed (headless `sora run --devices`, the Sora Parallel node's workers) is `sora.parallel_launch`.
`shard_weights` (FSDP2) spreads a model's weights over the group for models that do not fit one device.

Exactness: every process computes the same float32 operations on the same tokens as one process would; only the
attention kernel may differ (a key mask where padding was added), so the output matches one process to float32
rounding (tests/test_parallel.py checks 1e-5 relative).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import memory
from .attention import attention
from .errors import InputError
from .handle import ModelCall, ModelHandle

MODES = ("auto", "ulysses", "cfg")  # auto: both splits where a call allows; ulysses: the sequence; cfg: the passes
SHARDABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # weights FSDP2 can gather
TIMEOUT = timedelta(minutes=30)  # a collective waiting longer than this fails (a stuck peer)
STARTUP_S = 300.0  # how long ranks wait for rank 0 to open the group (imports and CUDA start take a while)


# ------------------------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------------------------

def parse_devices(text: str) -> tuple[torch.device, ...]:
    """"cuda:0,cuda:1" or "cpu,cpu" -> devices, one process each. CUDA devices need an index and may not repeat
    (NCCL takes one process per GPU); CPU and CUDA do not mix (one backend per group)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("devices is empty; give a comma-separated list such as 'cuda:0,cuda:1' (or 'cpu,cpu')")
    devices = []
    for item in (part.strip() for part in text.split(",")):
        try:
            device = torch.device(item)
        except RuntimeError:
            raise InputError(f"device {item!r} in {text!r} is not a device; use 'cuda:N' or 'cpu'") from None
        if device.type not in ("cpu", "cuda"):
            raise InputError(f"device {item!r}: only 'cuda:N' and 'cpu' devices are supported")
        if device.type == "cuda" and device.index is None:
            raise InputError(f"device {item!r} needs an index; write 'cuda:0', 'cuda:1', ...")
        devices.append(device)
    if len({d.type for d in devices}) > 1:
        raise InputError(f"devices {text!r} mix CPU and CUDA; use only CUDA devices, or only 'cpu' entries")
    cuda = [d.index for d in devices if d.type == "cuda"]
    if len(set(cuda)) < len(cuda):
        raise InputError(f"devices {text!r} name a GPU twice; NCCL runs one process per GPU")
    if cuda and max(cuda) >= torch.cuda.device_count():
        raise InputError(f"devices {text!r}: cuda:{max(cuda)} does not exist here "
                         f"({torch.cuda.device_count()} CUDA devices)")
    return tuple(devices)


# ------------------------------------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Traffic:
    """What this process sent to the others and which paths ran (benchmarks/parallel.py reports them)."""
    bytes_sent: int = 0
    ulysses: int = 0  # self-attentions through the all-to-all
    gathered: int = 0  # self-attentions through gathered keys and values (heads do not divide the group)
    cfg_split: int = 0  # calls split by guidance pass


class Comm:
    """Collectives over the members of one process group (this process among them), the bytes sent counted."""

    def __init__(self, group, members: Sequence[int], rank: int, traffic: Traffic):
        self.group = group
        self.size = len(members)
        self.index = list(members).index(rank)  # this process's place among the members
        self.traffic = traffic

    def all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """chunks[j] goes to member j; returns what each member sent here, in member order (chunks of one shape)."""
        chunks = [c.contiguous() for c in chunks]
        if self.size == 1:
            return chunks
        received = [torch.empty_like(c) for c in chunks]
        dist.all_to_all(received, chunks, group=self.group)
        self.traffic.bytes_sent += sum(_nbytes(c) for j, c in enumerate(chunks) if j != self.index)
        return received

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's `tensor` (all of one shape), in member order."""
        tensor = tensor.contiguous()
        if self.size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        self.traffic.bytes_sent += _nbytes(tensor) * (self.size - 1)
        return parts


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ------------------------------------------------------------------------------------------------------------------
# Sequence parallelism
# ------------------------------------------------------------------------------------------------------------------

class SequenceShard:
    """This process's share of the token sequence: tokens [index·l, (index+1)·l) of the sequence padded to P·l,
    l = ceil(L / P). Implements `sora.dit.TokenShard`."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def _share(self, length: int) -> int:
        return -(-length // self.comm.size)

    def local(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[B, L, ...] -> [B, l, ...]; the padding holds `fill` (1 for RoPE rotations: identity)."""
        share = self._share(x.shape[1])
        pad = share * self.comm.size - x.shape[1]
        if pad:
            x = torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), fill)], dim=1)
        return x[:, self.comm.index * share:(self.comm.index + 1) * share]

    def key_counts(self, counts: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
        """Key multiplicities [B, P·l] of the whole padded sequence of `tokens` [B, L, dim]: `counts` [B, L] (1 for
        real tokens; None: all real) and 0 on the padding; None when there is neither padding nor counts."""
        B, L = tokens.shape[:2]
        pad = self._share(L) * self.comm.size - L
        if counts is None and not pad:
            return None
        if counts is None:
            counts = torch.ones(B, L, dtype=torch.long, device=tokens.device)
        return F.pad(counts, (0, pad))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_counts: torch.Tensor | None,
               backend: str) -> torch.Tensor:
        """Local queries [B, l, H, d] attend to the keys and values of every share; returns [B, l, H, d]."""
        if q.shape[2] % self.comm.size == 0:
            return self._ulysses(q, k, v, key_counts, backend)
        return self._gathered(q, k, v, key_counts, backend)

    def _ulysses(self, q, k, v, key_counts, backend):
        """Heads split across the group: all-to-all to [B, P·l, H/P, d] (all tokens, this member's heads),
        attention, all-to-all back."""
        P = self.comm.size
        qkv = torch.stack([q, k, v])  # [3, B, l, H, d]
        received = self.comm.all_to_all(list(qkv.chunk(P, dim=3)))  # from member i: its tokens [3, B, l, H/P, d]
        q, k, v = torch.cat(received, dim=2)  # each [B, P·l, H/P, d]
        out = attention(q, k, v, key_counts=key_counts, backend=backend)  # [B, P·l, H/P, d]
        back = self.comm.all_to_all(list(out.chunk(P, dim=1)))  # from member j: this share's tokens, its heads
        self.comm.traffic.ulysses += 1
        return torch.cat(back, dim=2)  # [B, l, H, d]

    def _gathered(self, q, k, v, key_counts, backend):
        """Heads that do not split evenly: gather the keys and values of all tokens, attend the local queries."""
        kv = torch.stack([k, v])  # [2, B, l, H, d]
        k, v = torch.cat(self.comm.all_gather(kv), dim=2)  # each [B, P·l, H, d]
        self.comm.traffic.gathered += 1
        return attention(q, k, v, key_counts=key_counts, backend=backend)

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """[B, l, C] of every member -> [B, length, C]."""
        return torch.cat(self.comm.all_gather(x), dim=1)[:, :length]


# ------------------------------------------------------------------------------------------------------------------
# The group
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Ranks:
    """This process's place in a group of `world` processes (one per device) that compute model calls together;
    `control` is a gloo group for messages between them (the world group itself on the CPU)."""
    rank: int
    world: int
    device: torch.device
    control: object = None
    traffic: Traffic = field(default_factory=Traffic)
    _comms: dict = field(default_factory=dict, repr=False)  # cfg degree c -> (sequence Comm, cfg Comm)

    @classmethod
    def start(cls, rank: int, devices: Sequence[torch.device], folder: str | Path) -> Ranks:
        """Join the group of `devices` as rank `rank` (rendezvous through `folder`, see `_rendezvous`): the process's
        device, its memory manager on that device, and on the CPU an even share of the cores."""
        device = devices[rank]
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # P processes on one machine's cores: each gets its share, not all of them
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // len(devices)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=_rendezvous(rank, len(devices), Path(folder)), rank=rank,
                                world_size=len(devices), timeout=TIMEOUT)
        control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        memory.set_manager(memory.MemoryManager(memory.MemoryOptions(compute_device=device)))
        return cls(rank, len(devices), device, control)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def forward(self, handle: ModelHandle, mode: str, x, timestep: torch.Tensor, context: torch.Tensor,
                call: ModelCall | None = None, **conditions):
        """`handle(x, timestep, context, call, **conditions)` computed by the whole group; every process calls it
        with the same inputs and gets the whole output. mode: one of MODES."""
        if mode not in MODES:
            raise InputError(f"parallel mode {mode!r} is not one of {MODES}")
        passes = len(call.passes) if call is not None else 1
        split_passes = mode != "ulysses" and passes > 1 and isinstance(x, torch.Tensor) and x.shape[0] % passes == 0
        c = math.gcd(passes, self.world) if split_passes else 1
        sequence, across = self._groups(c)
        if c > 1:  # this subgroup's passes: [first, first + per) of the batch's n chunks
            per = passes // c
            first = across.index * per
            x, timestep, context = (_passes(v, passes, first, per) for v in (x, timestep, context))
            conditions = {name: _passes(value, passes, first, per) for name, value in conditions.items()}
            call = dataclasses.replace(call, passes=call.passes[first:first + per])
            self.traffic.cfg_split += 1
        if mode != "cfg" and sequence.size > 1:
            conditions["sequence"] = SequenceShard(sequence)
        out = handle(x, timestep, context, call, **conditions)
        if c > 1:
            out = torch.cat(across.all_gather(out), dim=0)  # the passes of every subgroup, in order
        return out

    def _groups(self, c: int) -> tuple[Comm, Comm]:
        """(this process's sequence group, its cfg group) for c cfg subgroups: the world as c rows of s = world/c
        consecutive ranks; a row splits the sequence, a column (one rank of each row) the passes."""
        if c not in self._comms:
            s = self.world // c
            rows = [list(range(r * s, (r + 1) * s)) for r in range(c)]
            columns = [list(range(j, self.world, s)) for j in range(s)]
            row, column = divmod(self.rank, s)
            self._comms[c] = (self._comm(rows, row), self._comm(columns, column))
        return self._comms[c]

    def _comm(self, partition: list[list[int]], mine: int) -> Comm:
        """A Comm over partition[mine]. Making a group is collective, so every process makes all of them, in order."""
        groups = []
        for members in partition:
            if len(members) == 1:
                groups.append(None)
            elif len(members) == self.world:
                groups.append(dist.group.WORLD)
            else:
                groups.append(dist.new_group(members))
        return Comm(groups[mine], partition[mine], self.rank, self.traffic)


def _rendezvous(rank: int, world: int, folder: Path) -> dist.TCPStore:
    """The group's key-value store on a free local port: rank 0 opens it on a port the system picks (so no other
    program can take it between choosing and binding) and writes the number into `folder`, where the others read
    it."""
    port_file = folder / "port"
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        partial = folder / "port.partial"
        partial.write_text(str(store.port))
        partial.replace(port_file)  # appears whole
        return store
    deadline = time.monotonic() + STARTUP_S
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not open the group's store within {STARTUP_S:.0f} s")
        time.sleep(0.02)
    return dist.TCPStore("127.0.0.1", int(port_file.read_text()), world, is_master=False, timeout=TIMEOUT)


def _passes(value, passes: int, first: int, count: int):
    """Chunks [first, first + count) of a batch of `passes` equal chunks: tensors whose batch splits so (also inside
    lists and (tensor, strength) pairs) are cut, other values kept."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] % passes:
            return value
        size = value.shape[0] // passes
        return value[first * size:(first + count) * size]
    if isinstance(value, (list, tuple)):
        return type(value)(_passes(v, passes, first, count) for v in value)
    return value


# ------------------------------------------------------------------------------------------------------------------
# Weight sharding
# ------------------------------------------------------------------------------------------------------------------

def fsdp_available() -> bool:
    """Whether this torch has FSDP2 (`torch.distributed.fsdp.fully_shard`, torch 2.6 and later)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


class ShardedModel:
    """A model sharded with FSDP2, called as it is: its weights already live on the devices, out of the memory
    manager's reach (which would move them). A `ModelHandle` takes it like the model itself."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def shard_weights(model: torch.nn.Module, ranks: Ranks) -> ShardedModel:
    """FSDP2: each process keeps 1/P of every block's weights (and of the rest of the model) on its device; a
    block's weights are gathered when the forward reaches it and dropped after it (raylight, ECOSYSTEM_FACTS §7).
    Every process of the group must shard the same model. Needs float weights (not fp8 or GGUF)."""
    if not fsdp_available():
        raise InputError(f"weight sharding needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is "
                         f"torch {torch.__version__}")
    stored = {p.dtype for p in model.parameters()} - set(SHARDABLE_DTYPES)
    if stored:
        raise InputError(f"weight sharding takes float32 / bf16 / fp16 weights; this model stores "
                         f"{sorted(map(str, stored))}: load it with weight_dtype bf16, or do not shard it")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for block in [*model.blocks, *getattr(model, "vace_blocks", ())]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return ShardedModel(model)
