"""What every node module shares: the category tree, the exported mappings, and errors that name the node.

Each node class sets `DISPLAY_NAME`; its class name (always "Sora...") is its node id. A bad value raises a
`sora.errors.InputError` (or `CheckpointError` for files) whose message starts with the node's display name and the
input, e.g. "Sora Empty Latent Video: input 'frames' = 30 is not 1+4k; use 29 or 33".
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ._sora import sora

ROOT = "sora"  # our category tree in the node menu: sora/loaders, sora/sampling, ...


def category(branch: str) -> str:
    return f"{ROOT}/{branch}"


def mappings(*classes: type) -> tuple[dict[str, type], dict[str, str]]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS for a module's node classes."""
    return {c.__name__: c for c in classes}, {c.__name__: c.DISPLAY_NAME for c in classes}


class Described(str):
    """A description of an input's value (e.g. "LATENT [1, 16, 21, 60, 104]"), shown as it is, not quoted."""


def input_error(node: type, name: str, value, why: str) -> Exception:
    """An InputError "<display name>: input '<name>' = <value> <why>"; text values are quoted."""
    shown = repr(value) if isinstance(value, str) and not isinstance(value, Described) else value
    return sora.errors.InputError(f"{node.DISPLAY_NAME}: input '{name}' = {shown} {why}")


@contextlib.contextmanager
def about(node: type, name: str) -> Iterator[None]:
    """Put the node's display name and the input in front of an InputError / CheckpointError raised inside."""
    errors = sora.errors
    try:
        yield
    except (errors.InputError, errors.CheckpointError) as e:
        if str(e).startswith(f"{node.DISPLAY_NAME}: "):  # already names the node and its input
            raise
        raise type(e)(f"{node.DISPLAY_NAME}: input '{name}': {e}") from e


def frames_on_grid(node: type, name: str, frames: int, temporal: int) -> int:
    """Latent frames of a clip of `frames` video frames, which must be 1 + temporal·k (`temporal`: the VAE's video
    frames per latent frame)."""
    if frames < 1 or (frames - 1) % temporal:
        below = 1 + max(frames - 1, 0) // temporal * temporal
        hint = f"use {below} or {below + temporal}" if below != frames else f"use {below + temporal}"
        raise input_error(node, name, frames, f"is not 1+{temporal}k (the VAE's causal frame grid); {hint}")
    return (frames - 1) // temporal + 1


def whole_latent_frames(node: type, name: str, frames: int, temporal: int) -> int:
    """Latent frames of `frames` video frames that continue a clip, which must be a positive multiple of
    `temporal`."""
    if frames < temporal or frames % temporal:
        below = frames // temporal * temporal
        hint = f"use {below} or {below + temporal}" if below else f"use {temporal}"
        raise input_error(node, name, frames, f"is not a multiple of {temporal} (one latent frame holds "
                                              f"{temporal} video frames); {hint}")
    return frames // temporal


def size_on_grid(node: type, name: str, size: int, grid: int, why: str) -> None:
    """Refuse a width or height that is not a multiple of `grid` pixels (`why`: where the grid comes from)."""
    if size % grid:
        below = size // grid * grid
        hint = f"{below} or {below + grid}" if below else f"{grid}"
        raise input_error(node, name, size, f"is not a multiple of {grid} ({why}); use {hint}")


def latent_samples(node: type, name: str, latent) -> object:
    """The `samples` tensor [B, C, T, H, W] of a video LATENT."""
    import torch

    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5:
        shape = list(samples.shape) if hasattr(samples, "shape") else type(samples).__name__
        raise input_error(node, name, Described(f"LATENT {shape}"),
                          "is not a video latent [batch, channels, frames, height, width]; connect a video latent "
                          "(image latents are 4-D)")
    return samples


def checked(node: type, rules: dict) -> bool | str:
    """The body of a VALIDATE_INPUTS: each constant value against its declared min / max (ComfyUI leaves that to
    a node for the inputs its VALIDATE_INPUTS takes) and its rule, `rule(node, name, value)` raising the node's
    InputError; None is a linked value, checked when the node runs. True, or "input 'name': why" for the first
    refusal (ComfyUI shows it before anything runs; `sora run` names the node and the input)."""
    spec = node.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, (value, rule) in rules.items():
        if value is None:
            continue
        options = declared[name][1] if len(declared[name]) > 1 else {}
        low, high = options.get("min"), options.get("max")
        numeric = isinstance(value, (int, float))
        if numeric and ((low is not None and value < low) or (high is not None and value > high)):
            return f"input '{name}': {value} is outside {low}..{high}"
        try:
            if rule is not None:
                rule(node, name, value)
        except sora.errors.InputError as e:
            why = str(e).split(f"input '{name}' = ", 1)[-1]
            return f"input '{name}': {why}"
    return True


def video_size(grid: int):
    """A rule: a width or height on the grid of `grid` pixels (VAE compression times the 2x2 patch)."""
    return lambda node, name, size: size_on_grid(node, name, size, grid, "VAE compression x 2x2 patches")


def video_frames(node: type, name: str, frames: int) -> None:
    """A rule: a whole clip of 1 + 4k video frames (every Wan VAE and nano's)."""
    frames_on_grid(node, name, frames, 4)


def continuing_frames(node: type, name: str, frames: int) -> None:
    """A rule: frames that continue a clip, a multiple of 4."""
    whole_latent_frames(node, name, frames, 4)
