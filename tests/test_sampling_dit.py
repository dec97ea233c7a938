"""The sampler driving the real WanDiT (tiny random configs): a whole run against diffusers' transformer and
scheduler, guidance batching, known frames and extra input channels."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from sora import conditioning
from sora.checkpoints import load_into
from sora.dit import PRESETS, WanDiT, convert_diffusers
from sora.latent_formats import WAN21
from sora.samplers import sample
from sora.schedules import flow_sigmas


def _tiny_dit(per_token: bool) -> WanDiT:
    config = dataclasses.replace(PRESETS["tiny"], per_token_timesteps=per_token)
    model = WanDiT(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():  # a fresh WanDiT has a zero head; give every weight a value
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _context(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(1, rows, 24, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_a_run_equals_diffusers_transformer_and_scheduler():
    # The same weights in diffusers' WanTransformer3DModel, stepped by its UniPC with the pipeline's guidance
    # loop. The only deliberate differences from diffusers' WanPipeline: the timestep is the float σ·1000 (as
    # ComfyUI passes it; the reference truncates it to an integer) and the start is σ0·ε (ComfyUI's noise
    # scaling; the pipeline starts from ε itself).
    cfg = PRESETS["tiny"]
    reference = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps, rope_max_seq_len=cfg.rope_max_len).eval()
    generator = torch.Generator().manual_seed(5)
    for parameter in reference.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    ours = WanDiT(cfg).eval()
    load_into(ours, convert_diffusers(reference.state_dict()), what="Wan DiT")

    steps, shift, guidance, shape = 6, 5.0, 4.0, (1, 16, 3, 4, 4)
    positive, negative = _context(5, 1), _context(8, 2)
    result = sample(ours, torch.zeros(shape), flow_sigmas(steps, shift), positive, negative, guidance=guidance,
                    sampler="unipc", seed=3)

    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    scheduler.set_timesteps(sigmas=np.linspace(0.999, 0.0, steps + 1)[:-1])  # the reference grid
    x = scheduler.sigmas[0] * torch.randn(shape, generator=torch.Generator().manual_seed(3))
    padded = [F.pad(c, (0, 0, 0, cfg.text_len - c.shape[1])) for c in (positive, negative)]
    for i, t in enumerate(scheduler.timesteps):
        timestep = (scheduler.sigmas[i].double() * 1000).float().reshape(1)
        v_cond, v_uncond = (reference(x, timestep, c, return_dict=False)[0] for c in padded)
        x = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, x).prev_sample
    torch.testing.assert_close(result, WAN21.denormalize(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batched_cfg_with_unequal_contexts_equals_sequential_on_the_dit():
    model = _tiny_dit(per_token=False)
    latent = torch.zeros(1, 16, 3, 4, 4)
    runs = [sample(model, latent, flow_sigmas(4, 5.0), _context(3, 1), _context(8, 2), guidance=5.0,
                   batched_cfg=batched) for batched in (True, False)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)
    assert runs[0].abs().sum() > 0


@pytest.mark.parametrize("per_token", [True, False])
@torch.no_grad()
def test_extension_on_the_dit_keeps_known_frames(per_token):
    model = _tiny_dit(per_token)
    clip = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    condition = conditioning.extend_forward(clip, overlap=2, new_frames=2)
    part = sample(model, condition["samples"], flow_sigmas(5, 5.0), _context(4, 1), _context(4, 2), guidance=4.0,
                  noise_mask=condition["noise_mask"], seed=1)
    assert torch.equal(part[:, :, :2], clip[:, :, -2:])
    joined = conditioning.join([clip, part], overlap=2)
    assert joined.shape[2] == 5 and torch.equal(joined[:, :, :3], clip)


@torch.no_grad()
def test_i2v_model_gets_its_extra_channels_on_every_call():
    config = dataclasses.replace(PRESETS["tiny"], model_type="i2v", in_dim=36)
    model = WanDiT(config).eval()
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    video = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    extra = conditioning.wan_i2v_channels(video, WAN21)
    out = sample(model, torch.zeros(1, 16, 3, 4, 4), flow_sigmas(3, 5.0), _context(4, 1), _context(6, 2),
                 guidance=5.0, extra_channels=extra)
    assert out.shape == (1, 16, 3, 4, 4) and len(inputs) == 3
    for x in inputs:  # [cond; uncond] batch, each with the same 20 extra channels after the 16 latent ones
        assert x.shape == (2, 36, 3, 4, 4)
        assert torch.equal(x[:, 16:], extra.expand(2, -1, -1, -1, -1))
