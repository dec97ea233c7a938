"""The memory manager: budget accounting, LRU eviction, placement, the text encoder and ComfyUI bridges, the cache.

On this CPU machine the compute and offload devices are both the CPU, so "resident" and "offloaded" differ only in
the manager's ledger; the ledger and the order of moves are what these tests check. Block streaming, which makes
real copies on the CPU too, is in test_memory_streaming.py.
"""
import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sora import memory
from sora.dit import DiTConfig, WanDiT, load_dit
from sora.errors import InputError
from sora.memory import MemoryManager, MemoryOptions
from sora.model_cache import ModelCache
from sora.text import EncodingCache, TextEncoder, encode_prompts

CPU = torch.device("cpu")


def linear_bytes(n_in: int, n_out: int) -> int:
    """Bytes of a float32 nn.Linear with bias, counted by hand."""
    return 4 * (n_in * n_out + n_out)


def tiny_dit(layers: int = 6, **changes) -> WanDiT:
    """A small random DiT with a non-zero head (a fresh Wan head is zero, which would make every output 0)."""
    sizes = {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": layers, "text_dim": 24, "text_len": 8,
             "freq_dim": 16}
    config = DiTConfig(**{**sizes, **changes})
    model = WanDiT(config).eval().requires_grad_(False)
    nn.init.normal_(model.head.head.weight, std=0.02)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and it spares the cores other test runs share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def manager():
    """A fresh CPU manager installed as the process's manager, put back afterwards."""
    fresh = MemoryManager(MemoryOptions(compute_device="cpu"))
    previous = memory.set_manager(fresh)
    yield fresh
    fresh.close()
    memory.set_manager(previous)


# ---------------------------------------------------------------------------------------------------------------
# Budget and accounting
# ---------------------------------------------------------------------------------------------------------------

def test_options_reject_bad_values():
    with pytest.raises(InputError, match="budget_bytes"):
        MemoryOptions(budget_bytes=-1)
    with pytest.raises(InputError, match="reserve_bytes"):
        MemoryOptions(reserve_bytes=1.5)


def test_automatic_budget_is_unlimited_on_cpu_and_set_by_the_user(manager):
    assert manager.budget() is None
    manager.configure(budget_bytes=12345)
    assert manager.budget() == 12345
    manager.configure(budget_bytes=None)
    assert manager.budget() is None


def test_automatic_cuda_budget_is_free_memory_plus_cache_plus_own_weights_minus_reserve(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * gib)
    cuda = MemoryManager(MemoryOptions(compute_device="cuda:0", reserve_bytes=gib // 2))
    assert cuda.budget() == 10 * gib + (3 - 2) * gib - gib // 2
    cuda._account(4 * gib)  # weights it placed are its own to reuse: they count back into the budget
    assert cuda.budget() == 14 * gib + gib - gib // 2
    cuda.configure(budget_bytes=8 * gib)  # a user budget can lower the automatic one...
    assert cuda.budget() == 8 * gib
    cuda.configure(budget_bytes=40 * gib)  # ...but never promise memory the card does not have
    assert cuda.budget() == 14 * gib + gib - gib // 2


def test_register_counts_bytes_and_use_places_the_model(manager):
    a = nn.Linear(100, 50)
    manager.configure(budget_bytes=10**6)
    manager.register(a, name="a")
    assert manager.state(a).location == "offloaded" and manager.placed_bytes == 0
    with manager.use(a) as placement:
        assert placement.location == "resident" and placement.device == CPU
        assert placement.placed_bytes == linear_bytes(100, 50) == manager.placed_bytes
    assert manager.state(a).location == "resident"  # stays until room is needed


def test_lru_eviction_order(manager):
    a, b, c = nn.Linear(100, 100), nn.Linear(100, 200), nn.Linear(100, 300)
    sa, sb, sc = linear_bytes(100, 100), linear_bytes(100, 200), linear_bytes(100, 300)
    manager.configure(budget_bytes=sb + sc + sa // 2)  # any two of them fit, never all three
    for model in (a, b):
        with manager.use(model):
            pass
    assert manager.placed_bytes == sa + sb

    with manager.use(c):  # a is the least recently used: it leaves, b stays
        pass
    assert [manager.state(m).location for m in (a, b, c)] == ["offloaded", "resident", "resident"]
    assert manager.placed_bytes == sb + sc

    with manager.use(a):  # now b is the least recently used
        pass
    assert [manager.state(m).location for m in (a, b, c)] == ["resident", "offloaded", "resident"]
    assert manager.placed_bytes == sa + sc
    assert manager.peak_placed_bytes <= manager.budget()


def test_a_model_in_use_is_never_evicted_and_what_cannot_fit_runs_offloaded(manager):
    a, b = nn.Linear(100, 200), nn.Linear(100, 300)
    big = nn.Linear(100, 400)
    manager.configure(budget_bytes=linear_bytes(100, 200) + linear_bytes(100, 300) + 100)
    with manager.use(a), manager.use(b):
        with manager.use(big) as placement:  # both others are busy: no room, so it runs in host memory
            assert placement.location == "offloaded" and placement.device == manager.offload_device
        assert manager.state(a).location == manager.state(b).location == "resident"
    with manager.use(big) as placement:  # idle now: they leave, least recently used first, as far as needed
        assert placement.location == "resident"
    assert manager.state(a).location == manager.state(b).location == "offloaded"  # it needs both gone


def test_activation_room_is_planned_with_the_weights(manager):
    a, b = nn.Linear(100, 100), nn.Linear(100, 100)
    size = linear_bytes(100, 100)
    manager.configure(budget_bytes=3 * size)
    with manager.use(a):
        pass
    with manager.use(b, activation_bytes=size + 1):  # b + its activations need more than the 2 free sizes
        assert manager.state(a).location == "offloaded"


def test_budget_for_evicts_idle_models_only_as_far_as_wanted(manager):
    a, b = nn.Linear(100, 100), nn.Linear(100, 100)
    size = linear_bytes(100, 100)
    manager.configure(budget_bytes=4 * size)
    for model in (a, b):
        with manager.use(model):
            pass
    assert manager.budget_for("vae_decode") == 2 * size  # nothing asked beyond what is free
    assert manager.budget_for("vae_decode", wanted=3 * size) == 3 * size  # a (least recently used) left
    assert [manager.state(m).location for m in (a, b)] == ["offloaded", "resident"]


def test_unregistered_models_and_bad_overrides_give_clear_errors(manager):
    with pytest.raises(InputError, match="not registered"):
        manager.state(nn.Linear(2, 2))
    with pytest.raises(InputError, match="torch modules"):
        manager.register("a model")
    with pytest.raises(InputError, match="no repeated blocks"), manager.use(nn.Linear(2, 2), blocks_resident=1):
        pass
    with pytest.raises(InputError, match=r"0\.\.2"), manager.use(tiny_dit(layers=2), blocks_resident=3):
        pass
    with pytest.raises(InputError, match="whole number of bytes"), manager.use(nn.Linear(2, 2), budget_bytes=-5):
        pass


def test_a_garbage_collected_model_leaves_the_ledger(manager):
    manager.configure(budget_bytes=10**6)
    model = nn.Linear(100, 100)
    with manager.use(model):
        pass
    assert manager.placed_bytes == linear_bytes(100, 100)
    del model
    assert manager.placed_bytes == 0  # the manager held it only weakly


# ---------------------------------------------------------------------------------------------------------------
# Text encoder placement
# ---------------------------------------------------------------------------------------------------------------

class TinyEncoder(TextEncoder):
    """A TextEncoder with a small embedding table as its model, counting how often the model is loaded."""
    name, dim, max_length, pad_length, pad_id = "tiny", 8, 16, None, 0

    def __init__(self):
        super().__init__(model=None, cache=EncodingCache())
        self.identity = ("tiny",)
        self.loads = 0

    def _tokenize(self, text):
        return [ord(ch) % 50 + 1 for ch in text][:self.max_length]

    def _load_model(self):
        self.loads += 1
        return nn.Embedding(51, self.dim)

    def _run(self, model, ids, mask):
        return model(ids)


def test_text_encoder_placement_comes_from_the_budget(manager):
    encoder = TinyEncoder()
    table = 51 * 8 * 4
    activation = 1 * encoder.max_length * encoder.dim * 64
    manager.configure(budget_bytes=table + activation - 1)  # one byte short: runs where it is, in host memory
    embeds, lengths = encode_prompts(encoder, ["a red ball"])
    model = encoder.model
    assert manager.state(model).location == "offloaded" and encoder.device == manager.offload_device
    assert torch.equal(embeds[0, :lengths[0]], model(torch.tensor(encoder._tokenize("a red ball"))))

    manager.configure(budget_bytes=table + activation)
    encode_prompts(encoder, ["a blue cube"])
    assert manager.state(model).location == "resident" and encoder.device == manager.compute_device


def test_cached_prompts_need_no_model(manager):
    encoder = TinyEncoder()
    first, _ = encode_prompts(encoder, ["a red ball"])
    encoder.unload()
    again, _ = encode_prompts(encoder, ["a red ball"])
    assert not encoder.loaded and encoder.loads == 1
    assert torch.equal(first, again)


# ---------------------------------------------------------------------------------------------------------------
# Inside ComfyUI
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def comfy(monkeypatch):
    """A stand-in `comfy.model_management` loaded the way ComfyUI loads it, recording the calls it gets."""
    calls = []
    module = types.ModuleType("comfy.model_management")
    module.get_torch_device = lambda: calls.append(("get_torch_device",)) or torch.device("cpu")
    module.free_memory = lambda nbytes, device, keep_loaded=(): calls.append(("free_memory", nbytes, device))
    module.soft_empty_cache = lambda force=False: calls.append(("soft_empty_cache",))
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", module)
    return calls


def test_inside_comfyui_the_manager_uses_its_device_frees_its_memory_and_clears_its_cache(comfy):
    inside = MemoryManager(MemoryOptions(reserve_bytes=1000))
    assert comfy == [("get_torch_device",)] and inside.compute_device == CPU

    model = nn.Linear(100, 100)
    size = linear_bytes(100, 100)
    inside.configure(budget_bytes=size + 10)
    with inside.use(model):  # fits: ComfyUI is not disturbed
        pass
    assert len(comfy) == 1

    other = nn.Linear(100, 100)
    with inside.use(other, activation_bytes=5):  # short of room: ComfyUI is asked first, then our idle model goes
        pass
    assert comfy[1] == ("free_memory", size + 5 + 1000, CPU)
    assert inside.state(model).location == "offloaded"

    inside.release()
    assert comfy[-1] == ("soft_empty_cache",)


def test_outside_comfyui_nothing_of_comfy_is_imported(manager):
    manager.configure(budget_bytes=100)
    with manager.use(nn.Linear(100, 100)):
        pass
    manager.release()
    assert "comfy" not in sys.modules and "comfy.model_management" not in sys.modules


# ---------------------------------------------------------------------------------------------------------------
# The model cache
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def dit_file(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_dit(layers=2).state_dict().items()}, path,
              metadata={"sora.num_heads": "2", "sora.text_len": "8"})
    return path


def test_loaders_get_the_same_object_for_the_same_file_and_options(manager, dit_file):
    cache = ModelCache()
    first = cache.load(load_dit, dit_file, compute_dtype=torch.float32)
    assert cache.load(load_dit, dit_file, compute_dtype=torch.float32) is first
    other = cache.load(load_dit, dit_file, compute_dtype=torch.bfloat16)
    assert other is not first and other.compute_dtype == torch.bfloat16
    assert manager.state(first).location == "offloaded"  # registered on load, placed on first use

    stat = dit_file.stat()
    os.utime(dit_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: load it again
    reloaded = cache.load(load_dit, dit_file, compute_dtype=torch.float32)
    assert reloaded is not first


def test_the_cache_forgets_least_recently_used_models_past_its_limit(manager, dit_file):
    probe = load_dit(dit_file, compute_dtype=torch.float32)
    cache = ModelCache(max_bytes=int(1.5 * sum(p.numel() * 4 for p in probe.parameters())))
    one = cache.load(load_dit, dit_file, compute_dtype=torch.float32)
    two = cache.load(load_dit, dit_file, compute_dtype=torch.bfloat16)  # both do not fit: `one` is forgotten
    assert len(cache) == 1 and cache.load(load_dit, dit_file, compute_dtype=torch.bfloat16) is two
    assert cache.load(load_dit, dit_file, compute_dtype=torch.float32) is not one


def test_unhashable_loader_options_are_refused(manager, dit_file):
    with pytest.raises(InputError, match="plain values"):
        ModelCache().load(load_dit, dit_file, compute_dtype=[torch.float32])
