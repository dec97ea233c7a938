"""Small stand-ins for the DiT that the sampling tests drive, and the properties of them those tests rely on.

`TinyDiT` has the sampler-facing contract of sora.dit.WanDiT: `model(x, timestep, context) -> v` (float32), a
`config` with `latent_format` and `per_token_timesteps`, zero-padding of the context to `text_len` with no key
mask, and timesteps shaped [B] or [B, T]. It mixes channels, time, text and position so that mistakes in what
the sampler feeds it change its output.
"""
from types import SimpleNamespace

import torch
from torch import nn


class TinyDiT(nn.Module):
    def __init__(self, latent_format: str = "wan21", channels: int = 16, text_dim: int = 8, text_len: int = 12,
                 per_token: bool = False, seed: int = 0):
        super().__init__()
        self.config = SimpleNamespace(latent_format=latent_format, per_token_timesteps=per_token)
        self.text_len = text_len
        generator = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(torch.randn(channels, channels, generator=generator) * 0.2)
        self.text = nn.Parameter(torch.randn(text_dim, channels, generator=generator) * 0.2)
        self.time = nn.Parameter(torch.randn(channels, generator=generator) * 0.2)
        self.calls = []  # (x, timestep, context) of every call, when `record` is set
        self.record = False

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.calls.append((x.clone(), timestep.clone(), context.clone()))
        B, C, T = x.shape[:3]
        pad = context.new_zeros(B, self.text_len - context.shape[1], context.shape[2])
        text = torch.tanh(torch.cat([context, pad], dim=1) @ self.text).mean(dim=1)  # [B, C]
        t = timestep / 1000.0
        t = t.view(B, 1, 1, 1, 1) if t.ndim == 1 else t.view(B, 1, T, 1, 1)
        mixed = torch.einsum("bcthw,cd->bdthw", x, self.mix)
        smooth = x.roll(1, dims=2) - x  # couples neighbouring frames, as attention over time would
        v = mixed + 0.3 * smooth + text.view(B, C, 1, 1, 1) + t * self.time.view(1, C, 1, 1, 1) + 0.5 * x
        return v.float()


def tiny_context(batch: int = 1, length: int = 5, width: int = 8, seed: int = 0) -> torch.Tensor:
    """Text embeddings [B, L, D] with zero rows past a random length, like real encoder output."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, width, generator=generator)


def test_tiny_dit_ignores_context_padding():
    # Guidance batches contexts of different lengths by zero-padding; the real DiT pads to text_len itself.
    model = TinyDiT()
    x = torch.randn(2, 16, 3, 4, 4)
    t = torch.tensor([500.0, 250.0])
    context = tiny_context(2, 5)
    padded = torch.cat([context, torch.zeros(2, 4, 8)], dim=1)
    assert torch.equal(model(x, t, context), model(x, t, padded))
    assert not torch.equal(model(x, t, context), model(x, t, tiny_context(2, 5, seed=1)))


def test_tiny_dit_reads_per_frame_timesteps():
    model = TinyDiT(per_token=True)
    x = torch.randn(1, 16, 3, 4, 4)
    per_frame = model(x, torch.tensor([[0.0, 500.0, 500.0]]), tiny_context())
    uniform = model(x, torch.tensor([500.0]), tiny_context())
    assert torch.equal(per_frame[:, :, 1:], uniform[:, :, 1:])
    assert not torch.equal(per_frame[:, :, 0], uniform[:, :, 0])
