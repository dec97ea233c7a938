"""Block streaming of the DiT: bit-identical outputs, the plan, real copies on the CPU, and the activation estimate.
"""
import weakref

import pytest
import torch
from test_memory import one_thread, tiny_dit  # noqa: F401 (one_thread: an autouse fixture)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from sora import memory
from sora.dit import DiTConfig, WanDiT, dit_activation_bytes
from sora.memory import MemoryManager, MemoryOptions
from sora.streaming import module_bytes


@pytest.fixture
def manager():
    fresh = MemoryManager(MemoryOptions(compute_device="cpu"))
    yield fresh
    fresh.close()


def inputs(batch=1, frames=2, size=8, per_token=False):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, frames, size, size, generator=generator)
    t = torch.rand(batch, frames, generator=generator) * 1000 if per_token else torch.rand(batch) * 1000
    return x, t, torch.randn(batch, 5, 24, generator=generator)


def hand_plan(model, budget, activation):
    """Blocks resident by the rule written out: the most r with fixed + r blocks + 2 streamed blocks + activations
    within the budget (all blocks when the whole model and the activations fit)."""
    block = module_bytes(model.blocks[0])
    fixed = module_bytes(model) - len(model.blocks) * block
    if fixed + len(model.blocks) * block + activation <= budget:
        return len(model.blocks)
    return max(r for r in range(len(model.blocks) - 1) if fixed + (r + 2) * block + activation <= budget)


def keep_resident(manager, model, blocks):
    """Set the blocks-resident override the way a model handle does on every call."""
    with manager.use(model, blocks_resident=blocks):
        pass


@pytest.mark.parametrize("per_token", [False, True])
def test_most_blocks_streamed_gives_bitwise_the_resident_output(manager, per_token):
    model = tiny_dit(layers=8)
    x, t, context = inputs(per_token=per_token)
    reference = model(x, t, context)
    original = {k: v.clone() for k, v in model.state_dict().items()}

    block = module_bytes(model.blocks[0])
    fixed = module_bytes(model) - 8 * block
    activation = model.activation_bytes((x, t, context), {})
    budget = fixed + 4 * block + activation  # room for 2 resident blocks and the 2-block window
    manager.configure(budget_bytes=budget)
    manager.register(model)
    out = model(x, t, context)
    placement = manager.state(model)

    assert placement.location == "streamed" and placement.blocks_resident == hand_plan(model, budget, activation) == 2
    assert torch.equal(out, reference)
    assert manager.peak_placed_bytes == fixed + 4 * block <= budget - activation
    assert manager.placed_bytes == fixed + 2 * block  # streamed blocks released after their forward
    assert model.blocks[5].ffn[0].weight.is_meta  # between forwards a streamed block holds no weights

    manager.unregister(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x, t, context), reference)


@pytest.mark.parametrize("resident", [0, 3, 6])
def test_manual_override_of_blocks_resident(manager, resident):
    model = tiny_dit(layers=6)
    x, t, context = inputs(batch=2)
    reference = model(x, t, context)
    keep_resident(manager, model, resident)  # wins over the (unlimited) budget
    assert torch.equal(model(x, t, context), reference)
    expected = "resident" if resident == 6 else "streamed"
    assert manager.state(model).location == expected and manager.state(model).blocks_resident == resident


def test_streamed_blocks_run_on_a_fresh_copy_of_their_weights(manager):
    model = tiny_dit(layers=4)
    stored = model.blocks[3].ffn[0].weight.data_ptr()
    keep_resident(manager, model, 1)
    model(*inputs())  # streaming starts with the first call
    seen = []
    model.blocks[3].register_forward_pre_hook(lambda block, args: seen.append(
        (block.ffn[0].weight.data_ptr(), block.ffn[0].weight.device)))  # runs after the streamer's own hook
    model(*inputs())
    model(*inputs())
    assert len(seen) == 2 and all(device.type == "cpu" for _, device in seen)
    assert all(pointer != stored for pointer, _ in seen)  # a real copy, not the stored tensor
    assert manager.placed_bytes == module_bytes(model) - 3 * module_bytes(model.blocks[0])


def test_call_arguments_move_as_nested_structures():
    x, t, context = inputs()
    moved = memory._to_device(((x, [t]), {"context": context, "steps": 3}), torch.device("meta"))
    (mx, (mt,)), kwargs = moved
    assert mx.is_meta and mt.is_meta and kwargs["context"].is_meta and kwargs["steps"] == 3
    assert mx.shape == x.shape and memory._first_device(moved) == torch.device("meta")


def test_streaming_more_shrinks_the_plan_and_keeps_the_output(manager):
    model = tiny_dit(layers=6)
    x, t, context = inputs()
    reference = model(x, t, context)
    keep_resident(manager, model, 4)
    model(x, t, context)
    keep_resident(manager, model, 1)  # settings change: re-planned at the next call
    assert torch.equal(model(x, t, context), reference)
    assert manager.state(model).blocks_resident == 1


# ---------------------------------------------------------------------------------------------------------------
# The activation estimate against the tensors actually alive during a forward
# ---------------------------------------------------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (views counted once)."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing, self.sizes, self.live, self.peak = existing, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.sizes or key in self.existing or storage.nbytes() == 0:
            return
        self.sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.live -= self.sizes.pop(key)


@pytest.mark.parametrize("dim, ffn_dim, heads, dtype, per_token", [
    (64, 384, 2, torch.float32, False), (64, 384, 2, torch.float32, True), (64, 384, 2, torch.bfloat16, False),
    (64, 384, 2, torch.bfloat16, True), (128, 512, 2, torch.float32, False)])
@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
def test_activation_estimate_bounds_the_measured_peak(dim, ffn_dim, heads, dtype, per_token, backend):
    config = DiTConfig(dim=dim, ffn_dim=ffn_dim, num_heads=heads, num_layers=2, text_dim=24, text_len=16,
                       freq_dim=16)
    model = WanDiT(config).eval().requires_grad_(False)
    model.set_compute(dtype=dtype, attention=backend)
    x, t, context = inputs(batch=2, frames=4, size=16, per_token=per_token)
    existing = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers(), x, t,
                                                                    context)}
    with torch.no_grad(), LiveBytes(existing) as live:
        model(x, t, context)
    estimate = model.activation_bytes((x, t, context), {})
    assert live.peak <= estimate <= 1.25 * live.peak


def test_activation_estimate_scales_with_tokens_and_batch():
    config = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
    one = dit_activation_bytes(config, batch=1, tokens=1000, compute_dtype=torch.bfloat16, per_token_timesteps=False)
    per_sample = config.text_len * 1536 * (4 + 4 * 2)
    # 1.3B in bf16: the FFN phase dominates: 12·D + 2·c·F = 18432 + 35840 bytes per token, plus RoPE and latent
    assert one == 1000 * (12 * 1536 + 2 * 2 * 8960 + 4 * 128 + 4 * 16 * 4) + per_sample
    two = dit_activation_bytes(config, batch=2, tokens=1000, compute_dtype=torch.bfloat16, per_token_timesteps=False)
    assert two == 2 * one
