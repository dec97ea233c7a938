"""Starting, feeding and supervising the processes of `sora.parallel`: the headless `sora run --devices` and the
Sora Parallel node's persistent worker group.

Both start one process per device with torch.multiprocessing (spawn), rendezvous on a free local port
(`sora.parallel.Ranks.start`). One process, the leader, runs everything but the model: headless that is rank 0
itself, which runs the workflow; in ComfyUI it is the ComfyUI process, which hands each model call to rank 0 of
its workers over a pipe. A handle
whose model runs on the ranks has a `ParallelRunner` (`ModelHandle.run_on`); each call travels as a `Call` (the
model's file, the handle's patches, the inputs on the CPU), rank 0 broadcasts it and every rank computes it
together (`sora.parallel.Ranks.forward`). The sampler loop, the noise, progress, previews and cancel stay in the
leader as they were, so outputs do not depend on the number of ranks.

Each rank loads the model itself from its file (`ModelSource`); no model crosses a process boundary. Patches
(LoRAs) are sent once per patch set.

Failure: a rank that raises records its error and exits. The supervisor (the `sora` command, or the leader of a
worker group) sees the exit at once, stops the other ranks and reports the first error, naming its rank; nothing
waits for a collective that will never complete. Ranks are killed with their supervisor (the parent-death
signal), so none outlives it.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessContext, ProcessException, ProcessExitedException

from .errors import InputError, SoraError
from .handle import MemorySettings, ModelCall, ModelHandle, WeightPatch
from .parallel import MODES, Ranks, parse_devices, shard_weights

DIT_SOCKET = "SORA_DIT"  # the socket type of a diffusion model handle (nodes/_handles.py)
POLL_S = 0.1  # how often a waiting supervisor checks its ranks
GRACE_S = 2.0  # how long failed ranks' peers get to exit before they are terminated, then killed
STOP_WAIT_S = 10.0  # how long a worker group gets to exit after Stop


class RankFailed(RuntimeError):
    """A rank raised or died; `rank`, `device`, the one-line `summary`, the rank's `trace` (traceback text) and
    whether it was an error the user can fix (`user_error`, a SoraError)."""

    def __init__(self, rank: int, device: str, summary: str, trace: str = "", user_error: bool = False):
        self.rank, self.device, self.summary, self.trace, self.user_error = rank, device, summary, trace, user_error
        super().__init__(f"rank {rank} ({device}) failed: {summary}")


# ------------------------------------------------------------------------------------------------------------------
# What travels: the model's file and one call
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParallelPlan:
    """How a model's calls split: `mode` one of sora.parallel.MODES; `shard_weights`: FSDP2 weight sharding."""
    mode: str = "auto"
    shard_weights: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"parallel mode {self.mode!r} is not one of {MODES}")


@dataclass(frozen=True)
class ModelSource:
    """The file a DiT was loaded from and its load options: every rank loads its own copy from it."""
    path: str
    weight_dtype: torch.dtype | None
    compute_dtype: torch.dtype
    attention: str

    @classmethod
    def of(cls, model) -> ModelSource:
        loaded = getattr(model, "loaded_from", None)
        if loaded is None:
            raise InputError(f"{type(model).__name__} was not loaded from a file (sora.dit.load_dit); the processes "
                             "of Sora Parallel load the model from its file, so load it with a loader node")
        path, weight_dtype = loaded
        return cls(str(Path(path).resolve()), weight_dtype, model.compute_dtype, model.attention_backend)

    def load(self) -> nn.Module:
        from .dit import load_dit
        return load_dit(self.path, weight_dtype=self.weight_dtype, compute_dtype=self.compute_dtype,
                        attention=self.attention)


@dataclass(frozen=True)
class Call:
    """One model call for the ranks. `patches` is None when the ranks already have the set `patches_key`."""
    source: ModelSource
    name: str
    expert: str
    patches_key: int
    patches: tuple[WeightPatch, ...] | None
    memory: MemorySettings
    plan: ParallelPlan
    x: object  # [B, C, T, H, W] or a list of [C, T, H, W], on the CPU
    timestep: torch.Tensor
    context: torch.Tensor
    call: ModelCall | None
    conditions: dict


@dataclass(frozen=True)
class Forget:
    """Drop the model loaded from `source` (the leader's copy was unloaded)."""
    source: ModelSource


@dataclass(frozen=True)
class Stop:
    """Leave the serving loop; the rank exits."""


def _moved(value, device):
    """Tensors in nested lists, tuples and dicts moved to `device` (on the CPU: detached copies that pickle)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


def _device_of(x) -> torch.device:
    return (x[0] if isinstance(x, (list, tuple)) else x).device


# ------------------------------------------------------------------------------------------------------------------
# A rank: serving calls
# ------------------------------------------------------------------------------------------------------------------

class Server:
    """What one rank keeps: its `Ranks`, the models it loaded (by source), the patch sets it was sent, and on rank 0
    (the leader inside the group, headless) the patch sets it sent."""

    def __init__(self, ranks: Ranks, devices: tuple[torch.device, ...]):
        self.ranks = ranks
        self.devices = devices
        self.models: dict[tuple, object] = {}  # (source, sharded) -> model
        self.patch_sets: dict[int, tuple[WeightPatch, ...]] = {}
        self.handles: dict[tuple, ModelHandle] = {}  # one per model, patch set and memory settings (patch caches)
        self.sent: dict[int, tuple] = {}  # rank 0 as leader: patch sets already sent, kept so their ids stay theirs
        self.clean = True  # no call failed half-way (a Stop could then not be delivered)

    # -- messages between the ranks ----------------------------------------------------------------------------

    def send(self, message) -> None:
        """Rank 0: hand `message` to every other rank."""
        if self.ranks.world > 1:
            dist.broadcast_object_list([message], src=0, group=self.ranks.control)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.ranks.control)
        return box[0]

    def follow(self) -> None:
        """Ranks other than 0: serve what rank 0 sends until it sends Stop."""
        while not isinstance(message := self.receive(), Stop):
            self.serve(message)

    def stop_followers(self) -> None:
        if self.clean:
            self.send(Stop())

    def serve(self, message):
        """Compute a Call together with the other ranks (the output on rank 0, None elsewhere) or drop a model."""
        if isinstance(message, Forget):
            for key in [k for k in self.models if k[0] == message.source]:
                del self.models[key]
            self.handles = {k: h for k, h in self.handles.items() if k[0] != message.source}
            return None
        try:
            out = self._call(message)
        except BaseException:
            self.clean = False
            raise
        return _moved(out, "cpu") if self.ranks.rank == 0 else None

    def _call(self, m: Call):
        if m.patches is not None:
            self.patch_sets[m.patches_key] = m.patches
        key = (m.source, m.plan.shard_weights, m.patches_key, m.memory)
        handle = self.handles.get(key)
        if handle is None:
            model = self._model(m.source, m.plan.shard_weights)
            handle = ModelHandle(model, m.name, m.expert, self.patch_sets[m.patches_key], memory=m.memory)
            self.handles[key] = handle
        x, timestep, context, conditions = _moved((m.x, m.timestep, m.context, m.conditions), self.ranks.device)
        return self.ranks.forward(handle, m.plan.mode, x, timestep, context, m.call, **conditions)

    def _model(self, source: ModelSource, sharded: bool):
        model = self.models.get((source, sharded))
        if model is None:
            model = source.load()
            if sharded:
                model = shard_weights(model, self.ranks)
            self.models[(source, sharded)] = model
        return model

    def adopt(self, source: ModelSource, model: nn.Module) -> None:
        """Rank 0 as leader: use the leader's own copy of the model instead of loading another."""
        self.models.setdefault((source, False), model)

    # -- rank 0 as the leader (headless) -----------------------------------------------------------------------

    def run(self, handle: ModelHandle, plan: ParallelPlan, x, timestep, context, call, conditions):
        message = _message(self.sent, handle, plan, x, timestep, context, call, conditions)
        self.send(message)
        if not plan.shard_weights:
            self.adopt(message.source, handle.model)
        return self.serve(message)


def _message(sent: dict, handle: ModelHandle, plan: ParallelPlan, x, timestep, context, call, conditions) -> Call:
    """The Call for one model call of `handle`; `sent` records the patch sets the ranks already have."""
    for name in ("blocks", "sequence"):
        if name in conditions:
            raise InputError(f"the model input {name!r} (a hook that runs in this process) cannot be sent to the "
                             "processes of Sora Parallel; remove the node that sets it, or Sora Parallel")
    if plan.shard_weights and handle.patches:
        raise InputError("weight patches (LoRAs) do not apply to sharded weights yet; turn Sora Parallel's "
                         "shard_weights off or remove the LoRA")
    key = id(handle.patches)
    new = key not in sent
    if new:
        sent[key] = handle.patches
    return Call(ModelSource.of(handle.model), handle.name, handle.expert, key, handle.patches if new else None,
                handle.memory, plan, _moved(x, "cpu"), _moved(timestep, "cpu"), _moved(context, "cpu"), call,
                _moved(conditions, "cpu"))


# ------------------------------------------------------------------------------------------------------------------
# Starting ranks
# ------------------------------------------------------------------------------------------------------------------

_server: Server | None = None  # this process's rank, when it is one


def inside_group() -> bool:
    """Whether this process is a rank of a running group (then rank 0 is the leader of its own model calls)."""
    return _server is not None


def _rank_main(index: int, devices: tuple, folder: str, target, args: tuple) -> None:
    """A rank's process: join the group, run `target(server, *args)`; an exception is recorded for the supervisor
    (with the time, so the first failure is told from the ones it caused) and re-raised."""
    global _server
    mp._prctl_pr_set_pdeathsig(signal.SIGKILL)  # the rank dies with its supervisor: no orphans
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)  # the terminal's Ctrl-C reaches the supervisor only, which passes it to rank 0
    try:
        ranks = Ranks.start(index, devices, folder)
        _server = Server(ranks, tuple(devices))
        result = target(_server, *args)
    except Exception as error:
        record = {"time": time.time(), "rank": index, "device": str(devices[index]),
                  "summary": f"{type(error).__name__}: {error}", "trace": traceback.format_exc(),
                  "user_error": isinstance(error, SoraError)}
        (Path(folder) / f"rank{index}.error").write_bytes(pickle.dumps(record))
        raise
    if index == 0:
        (Path(folder) / "result").write_bytes(pickle.dumps(result))
    _leave(ranks, index, len(devices), Path(folder))
    # Exit now, without the interpreter's teardown: C++ threads of the collectives' libraries still being destroyed
    # then aborted 1 exit in 8 with "terminate called without an active exception" (torch 2.13, gloo). Nothing is
    # left to clean up: the results are written and the supervisor removes the folder.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _leave(ranks: Ranks, index: int, world: int, folder: Path) -> None:
    """Leave the group in order: rank 0 hosts the group's store, so it leaves last, once every other rank has left
    (a rank whose peer's store vanished while it was leaving aborted, 1 run in 3)."""
    dist.barrier(group=ranks.control)
    if index != 0:
        ranks.close()
        (folder / f"rank{index}.left").touch()
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and not all((folder / f"rank{r}.left").exists() for r in range(1, world)):
        time.sleep(0.01)
    ranks.close()


def _start(devices: tuple, target, args: tuple) -> tuple[ProcessContext, str]:
    folder = tempfile.mkdtemp(prefix="sora-ranks-")
    context = mp.start_processes(_rank_main, args=(devices, folder, target, args), nprocs=len(devices), join=False,
                                 start_method="spawn")
    return context, folder


def _failure(folder: str, devices: tuple, error: ProcessException) -> RankFailed:
    """The first failure the ranks recorded, or the exit `error` reports when none did."""
    records = [pickle.loads(p.read_bytes()) for p in Path(folder).glob("rank*.error")]
    if records:
        first = min(records, key=lambda r: r["time"])
        return RankFailed(first["rank"], first["device"], first["summary"], first["trace"], first["user_error"])
    index = error.error_index
    if not isinstance(error, ProcessExitedException):
        return RankFailed(index, str(devices[index]), error.msg.strip().splitlines()[-1], error.msg)
    why = f"was killed by {error.signal_name}" if error.signal_name else f"exited with code {error.exit_code}"
    return RankFailed(index, str(devices[index]), f"the process {why}")


def _wait(context: ProcessContext, folder: str, devices: tuple) -> None:
    """Until every rank exited; the first one to fail stops the others and raises RankFailed."""
    try:
        while not context.join(timeout=POLL_S, grace_period=GRACE_S):
            pass
    except ProcessException as error:
        raise _failure(folder, devices, error) from None


def _end(context: ProcessContext, folder: str) -> None:
    """Kill whatever still runs (an interrupted supervisor) and remove the records."""
    for process in context.processes:
        if process.is_alive():
            process.kill()
        process.join()
    shutil.rmtree(folder, ignore_errors=True)


def launch(devices: str | tuple[torch.device, ...], target, args: tuple = ()):
    """Run `target(server, *args)` in one process per device (rank r on devices[r]; `target` a module-level
    function) and return rank 0's result. Ranks other than 0 usually call `server.follow()`, and rank 0 drives them
    (`Server.run`, or `ParallelRunner` handles) and finally `server.stop_followers()`. A rank that fails stops the
    others at once: RankFailed names it and carries its error."""
    devices = parse_devices(devices) if isinstance(devices, str) else tuple(devices)
    context, folder = _start(devices, target, args)
    try:
        _wait(context, folder, devices)
        return pickle.loads((Path(folder) / "result").read_bytes())
    finally:
        _end(context, folder)


# ------------------------------------------------------------------------------------------------------------------
# Headless: `sora run WORKFLOW --devices ...`
# ------------------------------------------------------------------------------------------------------------------

def run_command_on_devices(args) -> int:
    """The supervisor of `sora run --devices`: one rank per device; rank 0 runs the workflow (`cli.main` with the
    same arguments, inside the group), the others compute its model calls with it. Returns the exit code: rank 0's,
    or 1 with the failing rank's error when another rank failed."""
    if args.node_classes is not None:
        raise InputError("--devices runs this pack's own nodes; it cannot take other node classes")
    devices = parse_devices(args.devices)
    print(f"running the diffusion model on {len(devices)} processes: {', '.join(map(str, devices))}",
          file=sys.stderr, flush=True)
    argv = ["run", str(args.workflow), *[a for s in args.set for a in ("--set", s)], "--output-dir",
            str(args.output_dir), "--models-dir", str(args.models_dir), "--devices", args.devices,
            *(["--smoke"] if getattr(args, "smoke", False) else [])]
    context, folder = _start(devices, _headless_rank, (argv,))
    previous = signal.signal(signal.SIGINT, lambda *_: _pass_interrupt(context))
    try:
        _wait(context, folder, devices)
        return 0
    except RankFailed as failure:
        exited = context.processes[0].exitcode
        if failure.rank == 0 and not failure.trace and exited in (1, 2, 130):
            return exited  # rank 0 ended the workflow itself (an error it printed, or Ctrl-C)
        if failure.trace and not failure.user_error:
            print(failure.trace.rstrip(), file=sys.stderr, flush=True)
        print(f"error: {failure}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        _end(context, folder)


def _pass_interrupt(context: ProcessContext) -> None:
    """Ctrl-C reaches the supervisor only: rank 0 gets it and stops the workflow between two steps (a second one
    aborts it), as a single-process run would."""
    if context.processes[0].is_alive():
        os.kill(context.processes[0].pid, signal.SIGINT)


def _headless_rank(server: Server, argv: list[str]) -> None:
    if server.ranks.rank != 0:
        server.follow()
        return
    from . import cli
    try:
        code = cli.main(argv)
    finally:
        server.stop_followers()
    if code:
        sys.exit(code)


def with_models_on_ranks(node_classes: dict) -> dict:
    """Rank 0 of `sora run --devices`: the node classes with every node that makes a diffusion model from no other
    model (a loader) giving it back on the ranks (`on_devices`), so that the graph's model calls run on all of
    them; everything else as it was."""
    from .workflow import node_spec
    classes = {}
    for name, cls in node_classes.items():
        spec = node_spec(cls)
        makes = DIT_SOCKET in spec.return_types and all(i.type != DIT_SOCKET for i in spec.inputs.values())
        classes[name] = _on_ranks(cls, spec.return_types) if makes else cls
    return classes


def _on_ranks(cls: type, returns: tuple[str, ...]) -> type:
    """A subclass of the node class `cls` whose diffusion model outputs run on the group's ranks."""
    def run(self, *args, **kwargs):
        returned = getattr(super(subclass, self), cls.FUNCTION)(*args, **kwargs)
        result = returned.get("result", ()) if isinstance(returned, dict) else returned
        devices = ",".join(str(d) for d in _server.devices)
        result = tuple(on_devices(v, devices) if kind == DIT_SOCKET else v for v, kind in zip(result, returns))
        return {**returned, "result": result} if isinstance(returned, dict) else result

    subclass = type(cls.__name__, (cls,), {cls.FUNCTION: run, "__module__": cls.__module__})
    return subclass


# ------------------------------------------------------------------------------------------------------------------
# ComfyUI: a persistent worker group per device list
# ------------------------------------------------------------------------------------------------------------------

def _serve_pipe(server: Server, connection) -> None:
    """A worker group's ranks: rank 0 takes messages from the leader's pipe, hands them on and answers each."""
    if server.ranks.rank != 0:
        connection.close()
        server.follow()
        return
    while True:
        message = connection.recv()
        server.send(message)
        if isinstance(message, Stop):
            return
        connection.send(server.serve(message))


class WorkerGroup:
    """One worker process per device, started on first use and kept between calls; the leader is this process.

    Closed when every model it served is unloaded (garbage-collected here), at exit, or after a failure (the next
    call starts a fresh group).
    """

    def __init__(self, devices: tuple[torch.device, ...]):
        self.devices = devices
        self._context: ProcessContext | None = None
        self._folder = ""
        self._connection = None
        self._sent: dict[int, tuple] = {}
        self._sources: set[ModelSource] = set()  # models the workers hold
        self._released: set[ModelSource] = set()  # unloaded here, still to be dropped there
        self._watched: set[int] = set()  # ids of the leader's models with a finalizer
        self._lock = threading.RLock()

    @property
    def running(self) -> bool:
        return self._context is not None

    def pids(self) -> list[int]:
        return self._context.pids() if self._context is not None else []

    def run(self, handle: ModelHandle, plan: ParallelPlan, x, timestep, context, call, conditions):
        with self._lock:
            if self._context is None:
                self._start()
            message = _message(self._sent, handle, plan, x, timestep, context, call, conditions)
            self._watch(handle.model, message.source)
            self._sources.add(message.source)
            out = self._ask(message)
            self._apply_releases()
            return out

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._connection, theirs = ctx.Pipe()
        with _workers_main():
            self._context, self._folder = _start(self.devices, _serve_pipe, (theirs,))
        theirs.close()
        self._sent, self._sources, self._released = {}, set(), set()

    def _ask(self, message):
        """Send one message to rank 0 and wait for its answer, watching every rank meanwhile."""
        try:
            self._connection.send(message)
            while not self._connection.poll(POLL_S):
                self._check()
            return self._connection.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):  # rank 0 is gone: find out why
            deadline = time.monotonic() + GRACE_S + 1
            while time.monotonic() < deadline:
                self._check()
                time.sleep(POLL_S)
            self._fail(RankFailed(0, str(self.devices[0]), "the worker stopped answering"))

    def _check(self) -> None:
        try:
            if self._context.join(timeout=0, grace_period=GRACE_S):
                self._fail(RankFailed(0, str(self.devices[0]), "the workers exited"))
        except ProcessException as error:
            self._fail(_failure(self._folder, self.devices, error))

    def _fail(self, failure: RankFailed):
        self._reset()
        raise failure

    def _reset(self) -> None:
        if self._context is not None:
            _end(self._context, self._folder)
        if self._connection is not None:
            self._connection.close()
        self._context = self._connection = None

    def _watch(self, model, source: ModelSource) -> None:
        if id(model) not in self._watched:
            self._watched.add(id(model))
            weakref.finalize(model, self._release, id(model), source)

    def _release(self, model_id: int, source: ModelSource) -> None:
        """The leader's copy of a model was unloaded: drop the workers' copies, and the group when none is left
        (at once, or after the call in progress)."""
        self._watched.discard(model_id)
        self._released.add(source)
        if self._lock.acquire(blocking=False):
            try:
                self._apply_releases()
            finally:
                self._lock.release()

    def _apply_releases(self) -> None:
        while self._released and self._context is not None:
            source = self._released.pop()
            if source in self._sources:
                self._sources.discard(source)
                self._ask(Forget(source))
        if self._context is not None and not self._sources and not self._watched:
            self.close()

    def close(self) -> None:
        """Stop the workers (they leave their loop; stragglers are killed)."""
        with self._lock:
            if self._context is None:
                return
            try:
                self._connection.send(Stop())
                deadline = time.monotonic() + STOP_WAIT_S
                while not self._context.join(timeout=POLL_S) and time.monotonic() < deadline:
                    pass
            except (ProcessException, BrokenPipeError, OSError):
                pass  # closing anyway
            self._reset()


@contextlib.contextmanager
def _workers_main():
    """What spawned workers run first. They re-run the parent's main script when it was started as one (ComfyUI's
    main.py, which would parse arguments and run prestartup scripts): they run `sora/worker_main.py` instead, which
    makes the pack importable under the name ComfyUI gave it (its folder's path) when that is this package's
    name, so that the pickled worker code loads."""
    main = sys.modules.get("__main__")
    script = None
    if main is not None and getattr(main, "__spec__", None) is None:
        script = main.__dict__.pop("__file__", None)
    pack = __name__.removesuffix(".sora.parallel_launch")
    environment = {}
    if pack != __name__:  # imported as `<pack>.sora` (ComfyUI): workers need that name
        environment = {"SORA_PACK_MODULE": pack, "SORA_PACK_FOLDER": str(Path(__file__).resolve().parent.parent)}
        if main is not None:
            main.__file__ = str(Path(__file__).with_name("worker_main.py"))
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if main is not None:
            main.__dict__.pop("__file__", None)
            if script is not None:
                main.__file__ = script


_groups: dict[tuple[torch.device, ...], WorkerGroup] = {}


def worker_group(devices: tuple[torch.device, ...]) -> WorkerGroup:
    """The process's worker group for `devices` (made, not started, on first use)."""
    group = _groups.get(devices)
    if group is None:
        if not _groups:
            atexit.register(close_all)
        group = _groups[devices] = WorkerGroup(devices)
    return group


def close_all() -> None:
    """Stop every worker group of this process (at exit)."""
    for group in list(_groups.values()):
        group.close()


# ------------------------------------------------------------------------------------------------------------------
# Handles
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ParallelRunner:
    """A handle's runner (`ModelHandle.run_on`): each model call is computed by one process per device, with the
    handle's patches. Inside a group (rank 0 of `sora run --devices`) the group's own ranks compute it; elsewhere a
    worker group for `devices`."""
    devices: tuple[torch.device, ...]
    plan: ParallelPlan

    def __call__(self, handle: ModelHandle, x, timestep, context, call=None, **conditions):
        leader = _server if _server is not None else worker_group(self.devices)
        out = leader.run(handle, self.plan, x, timestep, context, call, conditions)
        return _moved(out, _device_of(x))


def on_devices(handle: ModelHandle, devices: str, mode: str = "auto", shard: bool = False) -> ModelHandle:
    """`handle` with its model calls computed on `devices` ("cuda:0,cuda:1"; "cpu,cpu" for tests), split as `mode`
    says, the weights sharded with FSDP2 when `shard`. Inside `sora run --devices`, the run's own devices."""
    plan = ParallelPlan(mode, shard)
    ModelSource.of(handle.model)  # a model without a file fails here, not in the workers
    return handle.run_on(ParallelRunner(parse_devices(devices), plan))
