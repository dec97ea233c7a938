"""Repeated runs do not grow memory: ten runs of a load -> sample -> decode workflow keep the process's resident
memory (RSS) within 3% of the second run, while a loader without the cache visibly leaks under the same measurement.

The workflow is made of small V1 node classes defined here that do what the loader, sampler and decode nodes do:
load through `sora.model_cache.load`, sample with `sora.samplers.sample` (the DiT streamed under a budget), decode
with `sora.vae.decode_video` (the idle DiT leaves the device to make room). The graph runs through the headless
runner (`sora.workflow.execute`).
"""
import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_memory import one_thread, tiny_dit  # noqa: F401 (one_thread: an autouse fixture)

from sora import memory, model_cache, samplers
from sora.dit import load_dit
from sora.memory import MemoryManager, MemoryOptions
from sora.streaming import module_bytes
from sora.vae import VAEConfig, WanVAE, decode_video, load_vae
from sora.workflow import execute

STATM = Path("/proc/self/statm")
LEAKED = []  # what the leaky loader keeps, as a cache bug would
PLACEMENTS = []  # where the DiT was after each sampling


def rss() -> int:
    """Resident memory of this process in bytes, after a full garbage collection."""
    gc.collect()
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class DiTLoader:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "load", ("SORA_DIT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {})}}

    def load(self, path):
        return (model_cache.load(load_dit, path, compute_dtype=torch.float32),)


class LeakyDiTLoader(DiTLoader):
    def load(self, path):
        model = load_dit(path, compute_dtype=torch.float32)
        memory.get_manager().register(model)
        LEAKED.append(model)
        return (model,)


class VAELoader:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "load", ("SORA_VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {})}}

    def load(self, path):
        return (model_cache.load(load_vae, path),)


class Sampler:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "sample", ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("SORA_DIT",), "seed": ("INT", {"default": 0, "min": 0, "max": 2**32})}}

    def sample(self, model, seed):
        generator = torch.Generator().manual_seed(seed)
        positive, negative = torch.randn(1, 6, 64, generator=generator), torch.randn(1, 3, 64, generator=generator)
        latent = samplers.sample(model, torch.zeros(1, 16, 2, 8, 8), torch.linspace(1.0, 0.0, 4), positive,
                                 negative, seed=seed)
        PLACEMENTS.append(memory.get_manager().state(model))
        return ({"samples": latent},)


class Decode:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "decode", ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("SORA_VAE",), "latent": ("LATENT",)}}

    def decode(self, vae, latent):
        return (decode_video(vae, latent["samples"]),)


class Output:
    CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "test", "show", (), True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def show(self, images):
        return {"ui": {"mean": [float(images.mean())]}}


NODES = {"DiTLoader": DiTLoader, "LeakyDiTLoader": LeakyDiTLoader, "VAELoader": VAELoader, "Sampler": Sampler,
         "Decode": Decode, "Output": Output}


def graph(dit_path, vae_path, loader="DiTLoader"):
    return {"1": {"class_type": loader, "inputs": {"path": str(dit_path)}},
            "2": {"class_type": "VAELoader", "inputs": {"path": str(vae_path)}},
            "3": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 5}},
            "4": {"class_type": "Decode", "inputs": {"vae": ["2", 0], "latent": ["3", 0]}},
            "5": {"class_type": "Output", "inputs": {"images": ["4", 0]}}}


@pytest.fixture
def files(tmp_path):
    """A ~19 MB DiT (large enough that leaking one per run shows in RSS) and a tiny VAE."""
    dit = tiny_dit(layers=4, dim=256, ffn_dim=1024, text_dim=64)
    dit_path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, dit_path,
              metadata={"sora.num_heads": "2", "sora.text_len": "8"})
    vae_path = tmp_path / "vae.safetensors"
    save_file(WanVAE(VAEConfig.tiny(z_dim=16)).state_dict(), vae_path)
    return dit_path, vae_path, module_bytes(dit)


@pytest.fixture
def manager(files):
    """The process's manager with a budget of 75% of the DiT: it streams, and leaves the device for the decode."""
    fresh = MemoryManager(MemoryOptions(compute_device="cpu", budget_bytes=int(0.75 * files[2])))
    previous = memory.set_manager(fresh)
    previous_cache, model_cache._cache = model_cache._cache, model_cache.ModelCache()
    yield fresh
    fresh.close()
    memory.set_manager(previous)
    model_cache._cache = previous_cache
    LEAKED.clear()
    PLACEMENTS.clear()


@pytest.mark.skipif(not STATM.exists(), reason="reads resident memory from /proc (Linux)")
def test_ten_runs_keep_resident_memory_within_3_percent_of_the_second(manager, files):
    dit_path, vae_path, _ = files
    sizes, means = [], []
    for _ in range(10):
        result = execute(graph(dit_path, vae_path), NODES)
        means.append(result.outputs["5"]["mean"][0])
        sizes.append(rss())
    dit = model_cache.load(load_dit, dit_path, compute_dtype=torch.float32)
    assert manager.state(dit).location == "offloaded"  # it made room for the decode...
    assert [p.location for p in PLACEMENTS] == ["streamed"] * 10  # ...and came back, streamed, for each run
    assert manager.peak_placed_bytes <= manager.budget()
    assert len(set(means)) == 1  # every run computed the same video
    assert all(abs(size - sizes[1]) <= 0.03 * sizes[1] for size in sizes[2:]), [s / 2**20 for s in sizes]


@pytest.mark.skipif(not STATM.exists(), reason="reads resident memory from /proc (Linux)")
def test_the_measurement_sees_a_leaking_loader(manager, files):
    dit_path, vae_path, dit_bytes = files
    sizes = []
    for _ in range(10):
        execute(graph(dit_path, vae_path, loader="LeakyDiTLoader"), NODES)
        sizes.append(rss())
    assert len(LEAKED) == 10
    assert sizes[-1] - sizes[1] >= 6 * dit_bytes  # eight more models held: the growth is there to see
    assert sizes[-1] > 1.03 * sizes[1]
