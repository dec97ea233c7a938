"""Out-of-memory recovery: an injected `torch.OutOfMemoryError` in a sampling step or a VAE decode is retried with a
smaller footprint and the run finishes with the result it would have had without the error."""
import logging

import pytest
import torch
from test_memory import one_thread, tiny_dit  # noqa: F401 (one_thread: an autouse fixture)
from torch import nn

from sora import memory, samplers
from sora.memory import MemoryManager, MemoryOptions
from sora.streaming import module_bytes
from sora.vae import VAEConfig, WanVAE, decode_video


@pytest.fixture
def manager(monkeypatch):
    """A fresh CPU manager as the process's manager, counting its `release` calls."""
    fresh = MemoryManager(MemoryOptions(compute_device="cpu"))
    previous = memory.set_manager(fresh)
    fresh.releases = 0
    release = fresh.release

    def counted():
        fresh.releases += 1
        release()
    monkeypatch.setattr(fresh, "release", counted)
    yield fresh
    fresh.close()
    memory.set_manager(previous)


def inject_oom(module: nn.Module, times: int, after_calls: int = 0) -> dict:
    """Make `module`'s forward raise an out-of-memory error `times` times, after `after_calls` normal calls."""
    state = {"calls": 0, "raised": 0}

    def hook(_, args):
        state["calls"] += 1
        if state["calls"] > after_calls and state["raised"] < times:
            state["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
    module.register_forward_pre_hook(hook)
    return state


def run(model, guidance=5.0, batched=True):
    generator = torch.Generator().manual_seed(3)
    positive, negative = torch.randn(1, 5, 24, generator=generator), torch.randn(1, 4, 24, generator=generator)
    return samplers.sample(model, torch.zeros(1, 16, 2, 8, 8), torch.linspace(1.0, 0.0, 5), positive,
                           negative if guidance != 1.0 else None, guidance=guidance, seed=7, batched_cfg=batched)


@pytest.fixture
def dit(manager):
    model = tiny_dit(layers=6)
    manager.register(model)
    return model


def test_first_idle_models_leave(manager, dit, caplog):
    reference = run(dit)
    other = nn.Linear(64, 64)
    with manager.use(other):
        pass
    inject_oom(dit.blocks[1], times=1, after_calls=2)
    with caplog.at_level(logging.WARNING, logger="sora.memory"):
        out = run(dit)
    assert torch.equal(out, reference)  # guidance stayed batched, the DiT resident: the same arithmetic
    assert manager.state(other).location == "offloaded" and manager.state(dit).location == "resident"
    assert "moving idle models" in caplog.text and manager.releases == 1


def test_then_guidance_runs_as_two_forwards(manager, dit, caplog):
    reference = run(dit, batched=False)
    inject_oom(dit.blocks[1], times=1)
    with caplog.at_level(logging.WARNING, logger="sora.memory"):
        out = run(dit, batched=True)
    assert torch.equal(out, reference)
    assert torch.allclose(out, run(dit, batched=True), atol=1e-5)  # and the batched run agrees
    assert "separate forwards" in caplog.text and "sampling step 1" in caplog.text


def test_then_more_blocks_stream(manager, dit, caplog):
    reference = run(dit, guidance=1.0)
    injected = inject_oom(dit.blocks[1], times=2, after_calls=2)  # in step 3, twice
    with caplog.at_level(logging.WARNING, logger="sora.memory"):
        out = run(dit, guidance=1.0)
    assert injected["raised"] == 2 and manager.releases == 2
    assert torch.equal(out, reference)  # streaming is exact
    placement = manager.state(dit)
    assert placement.location == "streamed" and placement.blocks_resident == 1  # 6 -> 3 -> 1
    assert caplog.text.count("streaming more of WanDiT") == 2


def test_when_nothing_is_left_to_shrink_the_error_propagates(manager, dit):
    injected = inject_oom(dit.blocks[0], times=100)
    with pytest.raises(torch.OutOfMemoryError):
        run(dit)
    # attempts: batched, sequential, then 3, 1 and 0 blocks resident
    assert injected["raised"] == 5 and manager.state(dit).blocks_resident == 0


def test_vae_decode_retries_with_smaller_tiles(manager):
    vae = WanVAE(VAEConfig.tiny()).eval().requires_grad_(False)
    latent = torch.randn(1, 4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    whole = vae.working_bytes(12, 12)
    free = int(1.5 * whole)
    manager.configure(budget_bytes=module_bytes(vae) + free)
    assert vae.plan_tiling(12, 12, free) is None and vae.plan_tiling(12, 12, free // 2) is not None

    assert torch.equal(decode_video(vae, latent), vae.decode(latent))  # fits: one tile
    injected = inject_oom(vae.decoder, times=1)
    out = decode_video(vae, latent)
    assert injected["raised"] == 1
    assert torch.equal(out, vae.decode(latent, memory_budget=int(free * 0.5)))  # tiled with half the room
    assert not torch.equal(out, vae.decode(latent))
    assert manager.budget_for("vae_decode") == int(free * 0.5)  # later decodes start small


def test_an_error_while_placing_the_weights_caps_the_next_plan(manager, dit, monkeypatch):
    reference = run(dit, guidance=1.0)
    manager.evict_idle()
    apply, failed = manager._apply, []

    def failing(entry, model, location, resident):  # the card refuses the weights, as a real GPU would
        if location == "resident" and not failed:
            failed.append(location)
            raise torch.OutOfMemoryError("CUDA out of memory while placing weights (injected by the test)")
        return apply(entry, model, location, resident)
    monkeypatch.setattr(manager, "_apply", failing)
    out = run(dit, guidance=1.0)
    assert failed and torch.equal(out, reference)
    placement = manager.state(dit)
    assert placement.location == "streamed" and placement.blocks_resident == 3


def test_settings_set_again_unchanged_keep_what_an_error_taught(manager, dit):
    inject_oom(dit.blocks[1], times=1)
    run(dit, guidance=1.0)
    assert manager.state(dit).blocks_resident == 3
    with manager.use(dit, blocks_resident=None):  # what every sampling step of a handle without options sets
        pass
    manager.configure(budget_bytes=None)
    run(dit, guidance=1.0)
    assert manager.state(dit).blocks_resident == 3  # no new out-of-memory error needed to find it again
    with manager.use(dit, budget_bytes=10**9):  # a budget for one run (Sora Memory Options) forgets nothing either
        assert manager.budget() == 10**9
    assert manager.budget() is None
    run(dit, guidance=1.0)
    assert manager.state(dit).blocks_resident == 3
    manager.configure(budget_bytes=10**9)  # a real change starts afresh
    run(dit, guidance=1.0)
    assert manager.state(dit).location == "resident"
