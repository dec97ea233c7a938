"""3D rotary position embedding of the Wan DiT (ARCH_FACTS §1.3).

Each attention head of size d holds d/2 channel pairs, interleaved as (2i, 2i+1) = (real, imag). The pairs are
split between the three axes of the patch grid: frames get d/2 - 2·⌊d/6⌋ pairs, rows and columns ⌊d/6⌋ each
(22 : 21 : 21 for d = 128). Each axis has its own frequency table whose exponent denominator is that axis' own
channel count: freq_j = theta^(-2j / d_axis). A token at grid position (f, h, w) rotates its frame pairs by f·freq,
its row pairs by h·freq and its column pairs by w·freq.

Angles are computed in float64, as the reference does, and only then rounded to float32 cos/sin. The rotation is
one complex64 multiply per pair (x0·c - x1·s, x0·s + x1·c in float32): it agrees with the reference's float64
rotation to float32 rounding, at a fraction of its cost.
"""
from __future__ import annotations

import torch

from .errors import InputError

THETA = 10000.0


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Channel pairs given to the frame, row and column axes; (22, 21, 21) for head_dim 128."""
    if head_dim % 2:
        raise InputError(f"RoPE needs an even head size, got {head_dim}")
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def axis_frequencies(pairs: int) -> torch.Tensor:
    """[pairs] float64 frequencies theta^(-2j / (2·pairs)) of one axis."""
    return THETA ** (-torch.arange(pairs, dtype=torch.float64) / pairs)


def rope_table(grid: tuple[int, int, int], head_dim: int, *, max_len: int = 1024,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit complex rotations for every token of a (frames, rows, cols) patch grid.

    Returns [frames·rows·cols, head_dim/2] complex64, tokens in row-major (f, h, w) order. `max_len` is the
    per-axis table length the model was trained with; positions past it are refused, as in the reference.
    """
    if max(grid) > max_len:
        raise InputError(f"patch grid {tuple(grid)} (frames, rows, cols) exceeds the model's RoPE table of "
                         f"{max_len} positions per axis; use fewer frames or a smaller size")
    angles = []
    for size, pairs in zip(grid, axis_pairs(head_dim)):
        positions = torch.arange(size, dtype=torch.float64)
        angles.append(torch.outer(positions, axis_frequencies(pairs)))  # [size, pairs]
    f, h, w = grid
    t_ang, h_ang, w_ang = angles
    full = torch.cat([t_ang[:, None, None, :].expand(f, h, w, -1),
                      h_ang[None, :, None, :].expand(f, h, w, -1),
                      w_ang[None, None, :, :].expand(f, h, w, -1)], dim=-1)  # [f, h, w, head_dim/2]
    full = full.reshape(f * h * w, -1)
    return torch.complex(full.cos().float(), full.sin().float()).to(device)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, L, heads, d] by rotations [B or 1, L, d/2] complex64.

    Computes in float32 whatever x's dtype and returns x's dtype.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, heads, d/2]
    rotated = torch.view_as_real(pairs * rotations.unsqueeze(2)).flatten(-2)
    return rotated.to(x.dtype)
