"""The CUDA-only branches, exercised on the CPU by injection and for real with `pytest -m device --device cuda`.

- Block streaming: on CUDA each streamed block is pinned once, copied on a side stream while the block before it
  computes, waited for by the compute stream before its own forward, and its copies handed back with
  `record_stream` (`sora.streaming.SideStreamCopies`). A recording copier checks that order on the CPU (a fake) and
  on a GPU (the real one, recorded); an out-of-memory error in a copy is retried like one in a forward.
- Out-of-memory retry with a CUDA compute device: the failed attempt's tensors are gone before the retry, the cache
  is emptied through `torch.cuda.empty_cache`, the log keeps only the first line of CUDA's long message.
- Attention backends: the messages when a package or the GPU is missing, and the flash-attn / SageAttention
  dispatch (16-bit inputs, repeated keys per sample) with a stand-in kernel where the package is not installed.
- On the test device: a tiny DiT against diffusers in bf16, streaming bit for bit against resident, and every
  attention backend available there against SDPA.
"""
import gc
import logging
import sys
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from test_dit import diffusers_forward, diffusers_model, ours_from, rel_err
from test_memory import one_thread, tiny_dit  # noqa: F401 (one_thread: an autouse fixture)

from sora import attention as attention_module
from sora import memory, samplers, streaming
from sora.attention import attention, available_backends, check_backend
from sora.dit import DiTConfig, load_dit
from sora.errors import InputError
from sora.handle import ModelHandle
from sora.memory import MemoryManager, MemoryOptions
from sora.streaming import module_bytes


def dit_inputs(device: torch.device, batch: int = 1):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, 2, 8, 8, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    return x.to(device), t.to(device), torch.randn(batch, 5, 24, generator=generator).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Block streaming: the side stream's order of operations
# ---------------------------------------------------------------------------------------------------------------

class FakeCopies:
    """`SideStreamCopies` for the CPU: clones instead of asynchronous copies, numbered events instead of CUDA's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events = 0

    def pin(self, tensor):
        return tensor.clone()

    def copy(self, tensors):
        self.events += 1
        return [t.clone() for t in tensors], f"event {self.events}"

    def wait(self, event):
        pass

    def release(self, copy):
        pass


class RecordingCopies:
    """Wraps a copier (the real one on CUDA, `FakeCopies` on the CPU) and logs what the streamer asks of it."""

    def __init__(self, inner, streamer: streaming.BlockStreamer):
        self.inner, self.streamer, self.log = inner, streamer, []
        self.pinned: set[int] = set()  # ids of the pinned store tensors
        self.copies: dict[int, int] = {}  # data pointer of a device copy -> block index
        self.events: dict[int, int] = {}  # id of an event -> block index

    def pin(self, tensor):
        pinned = self.inner.pin(tensor)
        self.pinned.add(id(pinned))
        return pinned

    def copy(self, tensors):
        assert all(id(t) in self.pinned for t in tensors), "a copy reads tensors that were not pinned"
        index = self._block_of(tensors)
        copies, event = self.inner.copy(tensors)
        self.copies.update({c.data_ptr(): index for c in copies})
        self.events[id(event)] = index
        self.log.append(("copy", index))
        return copies, event

    def wait(self, event):
        self.log.append(("wait", self.events[id(event)]))
        self.inner.wait(event)

    def release(self, copy):
        index = self.copies.pop(copy.data_ptr())  # the streamer hands back the copies it was given
        if not self.log or self.log[-1] != ("release", index):
            self.log.append(("release", index))
        self.inner.release(copy)

    def _block_of(self, tensors):
        for index, entries in self.streamer.store.items():
            if entries and entries[0][1] is tensors[0]:
                return index
        raise AssertionError("copied tensors belong to no streamed block")


@pytest.fixture
def recorded(monkeypatch):
    """Every BlockStreamer made in the test gets a RecordingCopies (around the real copier on CUDA); yields
    the list of those copiers."""
    made = []
    real = streaming.side_stream_copies
    original_init = streaming.BlockStreamer.__init__

    def init(self, blocks, resident, device, account):
        original_init(self, blocks, resident, device, account)
        self.copies = RecordingCopies(real(device) or FakeCopies(device), self)
        made.append(self.copies)
    monkeypatch.setattr(streaming.BlockStreamer, "__init__", init)
    return made


def log_compute(model, log):
    """Log ("compute", i) when block i starts its forward (after the streamer's own pre-hook)."""
    def hook(position):
        def before(block, args):
            log.append(("compute", position))
        return before
    return [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(model.blocks)]


def test_streamed_blocks_are_prefetched_on_the_side_stream_in_order(device, recorded):
    model = tiny_dit(layers=4).to(device)
    x, t, context = dit_inputs(device)
    reference = model(x, t, context)
    manager = MemoryManager(MemoryOptions(compute_device=device))
    try:
        with manager.use(model, blocks_resident=1):
            pass
        model(x, t, context)  # streaming starts at the first call
        (copier,) = recorded
        log = copier.log
        log.clear()
        hooks = log_compute(model, log)
        out = model(x, t, context)
        for hook in hooks:
            hook.remove()
        assert torch.equal(out, reference)
        # block i+1's copy starts before block i computes (overlap); block i waits for its own copy first
        assert log == [("copy", 1), ("compute", 0),
                       ("wait", 1), ("copy", 2), ("compute", 1), ("release", 1),
                       ("wait", 2), ("copy", 3), ("compute", 2), ("release", 2),
                       ("wait", 3), ("compute", 3), ("release", 3)]
        assert not copier.copies  # every copy was handed back (record_stream on CUDA)
        assert len(copier.pinned) == sum(len(streaming.tensor_slots(b)) for b in model.blocks[1:])
        block = module_bytes(model.blocks[0])
        assert manager.placed_bytes == module_bytes(model) - 3 * block
    finally:
        manager.close()


def test_out_of_memory_in_a_block_copy_is_retried_with_more_streaming(monkeypatch, caplog):
    manager = MemoryManager(MemoryOptions(compute_device="cpu"))
    previous = memory.set_manager(manager)
    fails = {"left": 1}

    class FailingCopies(FakeCopies):
        def copy(self, tensors):
            if fails["left"]:
                fails["left"] -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 MiB (injected)\n"
                                             "If reserved but unallocated memory is large try setting ...")
            return super().copy(tensors)
    monkeypatch.setattr(streaming, "side_stream_copies", FailingCopies)
    try:
        model = tiny_dit(layers=6)
        reference = run(model)
        with caplog.at_level(logging.WARNING, logger="sora.memory"):
            out = run(ModelHandle(model).with_memory(blocks_resident=4))  # Sora Memory Options: 2 blocks streamed
        assert fails["left"] == 0 and torch.equal(out, reference)
        placement = manager.state(model)
        assert placement.location == "streamed" and placement.blocks_resident == 2  # 4 -> 2
        block = module_bytes(model.blocks[0])
        assert manager.placed_bytes == module_bytes(model) - 4 * block  # nothing of the failed copy counted
        assert "streaming more of WanDiT (2 of 6 blocks resident)" in caplog.text
        assert "If reserved" not in caplog.text  # the first line of CUDA's message only
    finally:
        manager.close()
        memory.set_manager(previous)


def run(model):
    generator = torch.Generator().manual_seed(3)
    positive = torch.randn(1, 5, 24, generator=generator)
    return samplers.sample(model, torch.zeros(1, 16, 2, 8, 8), torch.linspace(1.0, 0.0, 4), positive, None,
                           guidance=1.0, seed=7)


# ---------------------------------------------------------------------------------------------------------------
# Out-of-memory retry with a CUDA compute device (no placement: the CPU cannot hold "cuda" tensors)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cuda_manager(monkeypatch):
    """A manager whose compute device is CUDA, with the CUDA memory queries and the cache emptying faked."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    manager = MemoryManager(MemoryOptions(compute_device="cuda:0"))
    manager.emptied = emptied
    return manager


def test_the_failed_attempts_tensors_are_freed_before_the_fallbacks_run(cuda_manager):
    seen = []

    def step():
        activations = torch.empty(1000)  # stands for the activations of the failed attempt
        seen.append(weakref.ref(activations))
        if len(seen) == 1:
            assert not cuda_manager.emptied
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        assert seen[0]() is None, "the failed attempt's tensor is still alive at the retry"
        return "done"

    halvings = []

    def fallback():  # runs while the error is handled: its traceback must no longer hold the attempt's frames
        assert seen[0]() is None, "the failed attempt's tensor is still alive while the fallback runs"
        halvings.append(True)
        return "halving something" if len(halvings) == 1 else None

    assert cuda_manager.retry_on_oom(step, fallback) == "done"
    assert len(seen) == 2 and cuda_manager.emptied == [True]  # the cache emptied once, through torch.cuda


def test_cuda_vae_working_memory_halves_down_to_its_floor(cuda_manager):
    halve = cuda_manager.smaller_work("vae_decode")
    full = cuda_manager.budget_for("vae_decode")
    assert full == 10 * 2**30 - cuda_manager.options.reserve_bytes
    changes = []
    while (change := halve()) is not None:
        changes.append(change)
    assert len(changes) == 6 and changes[0] == "halving the working memory of vae_decode"  # 1 -> 1/64
    assert cuda_manager.budget_for("vae_decode") == int(full / 64)

    def always_oom():
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to shrink: the error reaches the caller
        cuda_manager.retry_on_oom(always_oom, halve)
    gc.collect()


# ---------------------------------------------------------------------------------------------------------------
# Attention backends
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def package_present(monkeypatch):
    """flash_attn and sageattention look installed (find_spec finds them), whether or not they are."""
    find_spec = attention_module.importlib.util.find_spec
    monkeypatch.setattr(attention_module.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(name=name) if name in ("flash_attn", "sageattention")
                        else find_spec(name))


@pytest.mark.parametrize("backend", ["flash_attn", "sageattn"])
def test_an_installed_kernel_without_a_gpu_says_so(monkeypatch, package_present, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_backends() == ["sdpa", "matmul"]
    with pytest.raises(InputError, match=rf"attention backend '{backend}' is not available: it needs a CUDA GPU "
                                         r"and none is available\. Available here: \['sdpa', 'matmul'\]"):
        check_backend(backend)


def test_a_kernel_asked_for_cpu_tensors_names_the_device_and_the_way_out(monkeypatch, package_present):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_backends() == ["sdpa", "matmul", "flash_attn", "sageattn"]
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(InputError, match=r"'flash_attn' runs on CUDA only; the model is on cpu\. "
                                         r"Use attention='sdpa' on this device"):
        attention(q, q, q, backend="flash_attn")


def test_loading_with_a_missing_kernel_fails_at_load_time_with_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(attention_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"flash_attn package is not installed \(install it with `pip install "
                                         r"flash-attn --no-build-isolation`\)"):
        load_dit(tmp_path / "never_read.safetensors", attention="flash_attn")


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """flash_attn and sageattention modules whose kernels record their inputs and compute with SDPA."""
    calls = []

    def kernel(name, q, k, v):
        calls.append((name, q.dtype, k.shape[1]))
        out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                             v.transpose(1, 2).float())
        return out.transpose(1, 2).to(q.dtype)

    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = lambda q, k, v: kernel("flash_attn", q, k, v)
    sage = types.ModuleType("sageattention")
    sage.sageattn = lambda q, k, v, tensor_layout, is_causal: kernel("sageattn", q, k, v)
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "sageattention", sage)
    find_spec = attention_module.importlib.util.find_spec
    monkeypatch.setattr(attention_module.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(name=name) if name in sys.modules else find_spec(name))
    return calls


@pytest.mark.parametrize("backend", ["flash_attn", "sageattn"])
def test_kernel_dispatch_casts_to_16_bits_and_repeats_counted_keys(device, stand_in_kernels, backend):
    if device.type != "cuda":
        pytest.skip("the flash-attn / SageAttention dispatch runs on CUDA tensors only (--device cuda)")
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 2, 64, generator=generator).to(device) for n in (9, 5, 5))
    out = attention(q, k, v, backend=backend)
    assert out.dtype == torch.float32 and stand_in_kernels == [(backend, torch.bfloat16, 5)]
    assert (out - attention(q, k, v)).abs().max() < 2e-2  # bf16 inputs against float32 SDPA
    stand_in_kernels.clear()
    counts = torch.tensor([[1, 2, 0, 1, 3], [1, 1, 1, 1, 0]])
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_counts=counts, backend=backend)
    assert stand_in_kernels == [(backend, torch.bfloat16, 7), (backend, torch.bfloat16, 4)]  # one call per sample
    expected = attention(q, k, v, key_counts=counts)
    assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() < 2e-2


def test_every_available_backend_matches_sdpa_on_the_device(device):
    """bf16 attention at a DiT's head size on the test device: every backend this process can run (SDPA only,
    unless flash-attn / SageAttention are installed on a GPU machine) against float32 SDPA on the CPU.
    Tolerance 4·eps(bf16) of the largest output, as in test_dit_attention; SageAttention quantises q and k to int8,
    so it gets 8 times that."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 512, 4, 128, generator=generator) for _ in range(3))
    expected = attention(q, k, v)
    backends = [b for b in available_backends() if device.type == "cuda" or b in ("sdpa", "matmul")]
    for backend in backends:
        out = attention(*(t.to(device, torch.bfloat16) for t in (q, k, v)), backend=backend)
        tol = 4 * torch.finfo(torch.bfloat16).eps * (8 if backend == "sageattn" else 1)
        assert (out.float().cpu() - expected).abs().max() <= tol * expected.abs().max(), backend


# ---------------------------------------------------------------------------------------------------------------
# The DiT and streaming on the test device
# ---------------------------------------------------------------------------------------------------------------

def test_dit_forward_in_bf16_on_the_device_matches_diffusers(device):
    """Tiny Wan 2.1 DiT, bf16 weights and compute on the device, against diffusers in float32 on the CPU.
    Tolerance 4·eps(bf16)·sqrt(layers), the rounding bound benchmarks/dit_forward.py derives."""
    config = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=24, freq_dim=32)
    ref = diffusers_model(config, seed=1)
    for p in ref.parameters():  # the same bf16-rounded weights on both sides
        p.data = p.data.to(torch.bfloat16).float()
    ours = ours_from(ref, config)
    ours.to(device, torch.bfloat16)
    ours.set_compute(dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 16, 3, 8, 8, generator=generator), torch.randn(2, 7, 24, generator=generator)
    t = torch.tensor([999.0, 412.5])
    with torch.no_grad():
        out = ours(x.to(device), t.to(device), context.to(device))
    expected = diffusers_forward(ref, x, t, context, config.text_len)
    assert out.dtype == torch.float32 and out.device.type == device.type
    assert rel_err(out.cpu(), expected) <= 4 * 2**-8 * 2**0.5


def test_streaming_on_the_device_equals_resident_bit_for_bit(device):
    model = tiny_dit(layers=6).to(device)
    inputs = dit_inputs(device, batch=2)
    reference = model(*inputs)
    manager = MemoryManager(MemoryOptions(compute_device=device))
    try:
        for resident in (0, 3):
            with manager.use(model, blocks_resident=resident):
                pass
            out = model(*inputs)
            assert manager.state(model).location == "streamed" and manager.state(model).blocks_resident == resident
            assert torch.equal(out, reference), resident
        assert manager.peak_placed_bytes <= module_bytes(model)
    finally:
        manager.close()
