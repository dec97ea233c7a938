"""Frame conditioning: some latent frames are known, the rest are generated.

One mechanism serves text-to-video with given frames, image-to-video, extension forward and backward, connecting
two clips, looping and (with a partial schedule) video-to-video. A condition is a `LATENT` dict as ComfyUI keeps
it: `samples` holds the raw latent [B, C, T, H, W] with the known frames in place, and `noise_mask`
[B, 1, T, H, W] is 1 where frames are generated and 0 where they are kept. Core nodes read the same dict
(ComfyUI's Wan22ImageToVideoLatent writes exactly this form), so conditions pass between our nodes and core's.
(Wan's dedicated I2V models take their image through extra input channels instead; `wan_i2v_channels`.)

How the sampler keeps known frames (`KnownFrames`):
- Models trained with per-token timesteps (`config.per_token_timesteps`: Wan 2.2 TI2V-5B, nano) get timestep 0
  on kept frames and those frames stay clean for the whole run (ARCH_FACTS §4.8).
- Other models (Wan 2.1, the A14B experts) see one timestep for all frames, so kept frames are put back at the
  current noise level after every step, `(1 − σ)·known + σ·ε`, with the run's fixed initial noise ε.
Either way, when the schedule ends at σ = 0, the sampler returns kept frames bit-exactly equal to the given latent.

Frame counts (the causal 1 + 4k rule, ARCH_FACTS §2.2). A clip of T latent frames decodes to 1 + 4(T − 1) pixel
frames: latent frame 0 holds one pixel frame, every later one holds four. The builders count latent frames.
Extending a clip of T latent frames by N new frames with an overlap of k generates a part of k + N latent frames
whose first k equal the clip's last k; `join` keeps the overlap once, A ++ B[k:], giving T + N latent frames,
which is 1 + 4(T + N − 1) = F + 4N pixel frames: nothing doubled and nothing dropped. A clip's latent frame 0 was
encoded from a single pixel frame; where a join puts it after other frames (extend backward, connect: the later
clip's start), the decoder treats it as a four-frame chunk although it encodes one image. For a frame-exact
result there, re-encode the joined pixels.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError
from .latent_formats import LatentFormat
from .schedules import split_denoise

Latent = dict  # ComfyUI LATENT: {"samples": raw [B, C, T, H, W], "noise_mask": [B, 1, T, H, W] (optional)}


def _check_latent(name: str, latent: torch.Tensor) -> None:
    if not isinstance(latent, torch.Tensor) or latent.ndim != 5:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise InputError(f"{name} must be a video latent [B, C, T, H, W], got {shape}")


def keep_frames(samples: torch.Tensor, keep: Sequence[int]) -> Latent:
    """The basic condition: `samples` [B, C, T, H, W] with latent frames `keep` known, the others generated."""
    _check_latent("samples", samples)
    B, _, T, H, W = samples.shape
    mask = torch.ones(B, 1, T, H, W, dtype=torch.float32, device=samples.device)
    for index in keep:
        if not -T <= index < T:
            raise InputError(f"known frame {index} is outside the latent's {T} frames")
        mask[:, :, index] = 0.0
    return {"samples": samples, "noise_mask": mask}


def _check_counts(clip: torch.Tensor, overlap: int, new_frames: int) -> None:
    T = clip.shape[2]
    if not 1 <= overlap <= T:
        raise InputError(f"overlap must be between 1 and the clip's {T} latent frames, got {overlap}")
    if new_frames < 1:
        raise InputError(f"new_frames must be at least 1 latent frame (4 pixel frames), got {new_frames}")


def _blank(like: torch.Tensor, frames: int) -> torch.Tensor:
    # Zeros, like an empty latent: the sampler starts such frames from zero in model space.
    B, C, _, H, W = like.shape
    return like.new_zeros(B, C, frames, H, W)


def extend_forward(clip: torch.Tensor, overlap: int, new_frames: int) -> Latent:
    """Continue `clip` [B, C, T, H, W]: a part of `overlap + new_frames` latent frames whose first `overlap` are the
    clip's last ones. `join([clip, part], overlap)` gives T + new_frames latent frames."""
    _check_latent("clip", clip)
    _check_counts(clip, overlap, new_frames)
    samples = torch.cat([clip[:, :, -overlap:], _blank(clip, new_frames)], dim=2)
    return keep_frames(samples, range(overlap))


def extend_backward(clip: torch.Tensor, overlap: int, new_frames: int) -> Latent:
    """Lead into `clip`: `new_frames` new latent frames followed by the clip's first `overlap`.
    `join([part, clip], overlap)` gives new_frames + T latent frames."""
    _check_latent("clip", clip)
    _check_counts(clip, overlap, new_frames)
    samples = torch.cat([_blank(clip, new_frames), clip[:, :, :overlap]], dim=2)
    return keep_frames(samples, range(new_frames, new_frames + overlap))


def connect(first: torch.Tensor, second: torch.Tensor, overlap: int, new_frames: int) -> Latent:
    """Bridge two clips: the end of `first`, `new_frames` generated, the start of `second`.
    `join([first, bridge, second], overlap)` plays first, the bridge's new frames, then second."""
    _check_latent("first", first)
    _check_latent("second", second)
    if first.shape[:2] != second.shape[:2] or first.shape[3:] != second.shape[3:]:
        raise InputError(f"clips to connect must match in batch, channels and size: {tuple(first.shape)} vs "
                         f"{tuple(second.shape)}")
    _check_counts(first, overlap, new_frames)
    _check_counts(second, overlap, new_frames)
    samples = torch.cat([first[:, :, -overlap:], _blank(first, new_frames), second[:, :, :overlap]], dim=2)
    return keep_frames(samples, [*range(overlap), *range(overlap + new_frames, 2 * overlap + new_frames)])


def loop(clip: torch.Tensor, overlap: int, new_frames: int) -> Latent:
    """Frames that lead from the end of `clip` back into its start; `join([clip, bridge], overlap, loop=True)` is a
    clip whose last frame flows into its first when played on repeat."""
    return connect(clip, clip, overlap, new_frames)


def image_to_video(image: torch.Tensor, latent_frames: int) -> Latent:
    """Animate an image: `image` [B, C, 1, H, W] (the VAE encoding of one pixel frame) becomes latent frame 0 of a
    clip of `latent_frames` frames (1 + 4(latent_frames − 1) pixel frames); the rest are generated."""
    _check_latent("image", image)
    known = image.shape[2]
    if latent_frames <= known:
        raise InputError(f"latent_frames must exceed the {known} given frame(s), got {latent_frames}")
    samples = torch.cat([image, _blank(image, latent_frames - known)], dim=2)
    return keep_frames(samples, range(known))


def video_to_video(video: torch.Tensor, sigmas: torch.Tensor, strength: float) -> tuple[Latent, torch.Tensor]:
    """Restyle `video` [B, C, T, H, W]: sample from the input noised to `strength` ∈ [0, 1].

    Returns the latent and the schedule's last round(steps·strength) steps (ComfyUI's SplitSigmasDenoise); the
    sampler noises the input to the first of them. Strength 0 leaves no steps, so the input comes back unchanged;
    strength 1 ignores the input.
    """
    _check_latent("video", video)
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength}; 0 keeps the input, 1 ignores it")
    return {"samples": video}, split_denoise(sigmas, strength)


def wan_i2v_channels(video: torch.Tensor, fmt: LatentFormat, known: Sequence[int] = (0,)) -> torch.Tensor:
    """The 20 extra input channels of Wan 2.1 I2V and Wan 2.2 I2V-A14B (ARCH_FACTS §4.7), for `sample`'s
    `extra_channels`: a 4-channel mask of the known pixel frames (1 = known, the reference's sense), then the
    normalised latent of the conditioning video.

    video: raw latent [B, 16, T, H, W] of the conditioning video: the image at its pixel frame(s), mid-gray
        (0 in [-1, 1]) elsewhere, VAE-encoded.
    known: the known pixel frames of the 1 + 4(T − 1); (0,) for I2V, (0, -1) for first-last-frame.
    Returns [B, 20, T, H, W].
    """
    _check_latent("video", video)
    _, _, T, H, W = video.shape
    return wan_i2v_concat(video, wan_i2v_mask(known, T, H, W, fmt.temporal), fmt)


# ---------------------------------------------------------------------------------------------------------------
# The Wan I2V image condition as ComfyUI carries it
# ---------------------------------------------------------------------------------------------------------------
# Core's WanImageToVideo / WanFirstLastFrameToVideo put two tensors into the extras of every CONDITIONING entry:
# `concat_latent_image`, the raw latent [B, 16, T, H, W] of the conditioning video, and `concat_mask`
# [1, 1 | 4, T, H, W] with 0 where pixel frames are known and 1 where they are generated (one channel: per latent
# frame; four: per pixel frame, one channel per slot). Core's model (WAN21.concat_cond) turns them into the same
# 20 channels as `wan_i2v_channels`; `wan_i2v_concat` does that here, so either side's condition drives the other's
# sampler.

def wan_i2v_video(frames: int, height: int, width: int, start: torch.Tensor | None = None,
                  end: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """The conditioning video of a Wan I2V model (ARCH_FACTS §4.7) and its known pixel frames.

    start, end: clips [1, 3, N, h, w] in -1..1 (N = 1 for an image), each resized to cover height x width and
        centre-cropped (`fit_frames`); `start` opens the video, `end` (first-last-frame) closes it.
    Returns the video [1, 3, frames, height, width] with 0 (mid-gray) on every other frame, and the indices of
    the known pixel frames (for `wan_i2v_mask`).
    """
    given = {name: clip for name, clip in (("start", start), ("end", end)) if clip is not None}
    if not given:
        raise InputError("an image-to-video condition needs a start image, an end image or both")
    for name, clip in given.items():
        if not isinstance(clip, torch.Tensor) or clip.ndim != 5 or clip.shape[:2] != (1, 3):
            got = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
            raise InputError(f"the {name} frames must be a clip [1, 3, N, H, W] in -1..1, got {got}")
    n_start = start.shape[2] if start is not None else 0
    n_end = end.shape[2] if end is not None else 0
    if n_start + n_end >= frames:
        raise InputError(f"{n_start} start and {n_end} end frame(s) leave nothing to generate in {frames} frames; "
                         f"use more frames or fewer images")
    video = torch.zeros(1, 3, frames, height, width)
    if start is not None:
        video[:, :, :n_start] = fit_frames(start, height, width)
    if end is not None:
        video[:, :, frames - n_end:] = fit_frames(end, height, width)
    return video, [*range(n_start), *range(frames - n_end, frames)]


def fit_frames(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`clip` [B, 3, N, h, w] resized to cover height x width and centre-cropped, so the aspect ratio is kept
    (bilinear, antialiased when shrinking; ComfyUI's "center" crop)."""
    B, C, N, h, w = clip.shape
    if w * height > h * width:  # wider than the target: crop the sides
        keep = round(h * width / height)
        clip = clip[..., (w - keep) // 2:(w - keep) // 2 + keep]
    elif w * height < h * width:  # taller: crop top and bottom
        keep = round(w * height / width)
        clip = clip[..., (h - keep) // 2:(h - keep) // 2 + keep, :]
    if clip.shape[-2:] == (height, width):
        return clip
    images = clip.permute(0, 2, 1, 3, 4).reshape(B * N, C, *clip.shape[-2:])  # [B·N, 3, h', w']
    images = torch.nn.functional.interpolate(images.float(), size=(height, width), mode="bilinear",
                                             align_corners=False, antialias=True)
    return images.reshape(B, N, C, height, width).permute(0, 2, 1, 3, 4)


def wan_i2v_mask(known: Sequence[int], latent_frames: int, height: int, width: int, temporal: int = 4
                 ) -> torch.Tensor:
    """ComfyUI's `concat_mask` for known pixel frames: [1, temporal, T, height, width], 0 on the slots of known
    pixel frames and 1 elsewhere (core's sense, the reverse of the reference's).

    Latent frame 0 holds one pixel frame, repeated to fill its `temporal` slots; then slot k of latent frame j is
    pixel frame temporal·j + k − (temporal − 1) (ARCH_FACTS §4.7).
    """
    frames = 1 + temporal * (latent_frames - 1)
    pixel = torch.zeros(frames)
    for index in known:
        if not -frames <= index < frames:
            raise InputError(f"known pixel frame {index} is outside the video's {frames} frames")
        pixel[index] = 1.0
    pixel = torch.cat([pixel[:1].repeat(temporal - 1), pixel])  # [temporal·T]
    slots = pixel.view(latent_frames, temporal).T  # [temporal, T], 1 = known
    return (1.0 - slots)[None, :, :, None, None].expand(1, -1, -1, height, width).contiguous()


def wan_i2v_concat(concat_latent_image: torch.Tensor, concat_mask: torch.Tensor, fmt: LatentFormat
                   ) -> torch.Tensor:
    """The extra input channels [B, 4 + C, T, H, W] from ComfyUI's condition: the mask in the reference's sense
    (1 = known; a one-channel mask fills all four slots), then the normalised `concat_latent_image`.

    concat_latent_image: raw latent [B, C, T, H, W] of the conditioning video (C = the format's channels).
    concat_mask: [1 | B, 1 | 4, T, H | 1, W | 1], 0 = known, 1 = generated.
    """
    _check_latent("concat_latent_image", concat_latent_image)
    B, C, T, H, W = concat_latent_image.shape
    if C != fmt.channels:
        raise InputError(f"concat_latent_image has {C} channels, but a {fmt.name} image-to-video model takes the "
                         f"{fmt.channels}-channel latent of one conditioning video (from Sora Wan Image To Video or "
                         "core's WanImageToVideo / WanFirstLastFrameToVideo)")
    if not isinstance(concat_mask, torch.Tensor) or concat_mask.ndim != 5 or concat_mask.shape[1] not in (1, 4):
        got = tuple(concat_mask.shape) if isinstance(concat_mask, torch.Tensor) else type(concat_mask).__name__
        raise InputError(f"concat_mask must be [1, 1 or 4, T, H, W] (0 = known frames), got {got}")
    fits = [have in (1, want) for have, want in zip(concat_mask.shape, (B, 4, T, H, W))]
    if not all(fits) or concat_mask.shape[2] != T:
        raise InputError(f"concat_mask {tuple(concat_mask.shape)} does not fit concat_latent_image "
                         f"{tuple(concat_latent_image.shape)}; build both with one image-to-video node")
    known = (1.0 - concat_mask.float()).to(concat_latent_image.device).expand(B, 4, T, H, W)
    return torch.cat([known, fmt.normalize(concat_latent_image.float())], dim=1)


def image_condition(cond: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(`concat_latent_image`, `concat_mask`) from the first CONDITIONING entry that carries an image condition,
    or None when none does."""
    for entry in cond if isinstance(cond, (list, tuple)) else ():
        extras = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if isinstance(extras, dict) and "concat_latent_image" in extras:
            if extras.get("concat_mask_index", 0) != 0 or "concat_mask" not in extras:
                raise InputError("the CONDITIONING carries a concat_latent_image without a leading concat_mask "
                                 "(a Wan Fun / control condition); a Wan image-to-video model needs one from Sora "
                                 "Wan Image To Video or core's WanImageToVideo")
            return extras["concat_latent_image"], extras["concat_mask"]
    return None


def with_image_condition(cond: list, concat_latent_image: torch.Tensor, concat_mask: torch.Tensor,
                         clip_vision_output=None) -> list:
    """A new CONDITIONING whose every entry carries the image condition, and the CLIP vision output when given
    (the input is left unchanged)."""
    added = {"concat_latent_image": concat_latent_image, "concat_mask": concat_mask}
    if clip_vision_output is not None:
        added["clip_vision_output"] = clip_vision_output
    return [[emb, {**extras, **added}] for emb, extras in cond]


def image_tokens(cond: list) -> torch.Tensor | None:
    """The CLIP image tokens [B, N, D] (`clip_vision_output.penultimate_hidden_states`, as core's Wan nodes and
    ours store them) of the first CONDITIONING entry that carries a CLIP vision output, or None."""
    for entry in cond if isinstance(cond, (list, tuple)) else ():
        extras = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        output = extras.get("clip_vision_output") if isinstance(extras, dict) else None
        if output is None:
            continue
        tokens = getattr(output, "penultimate_hidden_states", None)
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
            got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"the CONDITIONING's clip_vision_output has no [B, N, D] penultimate_hidden_states "
                             f"(got {got}); make it with a CLIP Vision Encode node")
        return tokens
    return None


def join(parts: Sequence[torch.Tensor], overlap: int, loop: bool = False, atol: float = 1e-4) -> torch.Tensor:
    """Merge consecutive parts into one clip: parts[i]'s last `overlap` latent frames are parts[i + 1]'s first,
    and each overlap is kept once: P0 ++ P1[overlap:] ++ P2[overlap:] ...

    With `loop` the last part ends in the first part's opening frames, which are dropped from the end.
    Forward extension: join([clip, part], k); backward: join([part, clip], k); connect: join([a, bridge, b], k);
    loop: join([clip, bridge], k, loop=True). Parts whose overlaps differ by more than `atol` are not pieces of
    one clip and raise an InputError.
    """
    if len(parts) < 2:
        raise InputError("join needs at least two parts")
    for i, part in enumerate(parts):
        _check_latent(f"part {i}", part)
        if not 1 <= overlap <= part.shape[2]:
            raise InputError(f"overlap {overlap} does not fit part {i} of {part.shape[2]} latent frames")
    pairs = list(itertools.pairwise(parts))
    if loop:
        pairs.append((parts[-1], parts[0]))
    for i, (left, right) in enumerate(pairs):
        if left.shape[:2] != right.shape[:2] or left.shape[3:] != right.shape[3:]:
            raise InputError(f"parts differ in batch, channels or size: {tuple(left.shape)} vs {tuple(right.shape)}")
        if not torch.allclose(left[:, :, -overlap:], right[:, :, :overlap], rtol=0.0, atol=atol):
            raise InputError(f"the last {overlap} latent frames of part {i} are not the first {overlap} of the next "
                             "part; join a clip with the extension generated from it, using the same overlap")
    merged = torch.cat([parts[0]] + [part[:, :, overlap:] for part in parts[1:]], dim=2)
    return merged[:, :, :-overlap] if loop else merged


# ---------------------------------------------------------------------------------------------------------------
# What the sampler does with a condition
# ---------------------------------------------------------------------------------------------------------------

def prepare_mask(noise_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A LATENT `noise_mask` as a float mask broadcastable to the latent `shape` [B, C, T, H, W]."""
    if not isinstance(noise_mask, torch.Tensor) or noise_mask.ndim != 5:
        got = tuple(noise_mask.shape) if isinstance(noise_mask, torch.Tensor) else type(noise_mask).__name__
        raise InputError(f"a video noise_mask must be [B, 1, T, H, W] (1 = generate, 0 = keep), got {got}; "
                         "build it with the frame-conditioning nodes")
    B, C, T, H, W = shape
    for axis, (have, want) in enumerate(zip(noise_mask.shape, (B, C, T, H, W))):
        if have not in (1, want):
            raise InputError(f"noise_mask {tuple(noise_mask.shape)} does not fit the latent {tuple(shape)} "
                             f"(axis {axis}); it must have the latent's frame count and size, or 1")
    return noise_mask.float()


@dataclass
class KnownFrames:
    """A condition prepared for one run, in model space.

    mask: [B, 1|C, T, H|1, W|1] float, 1 = generate, 0 = keep.
    known: [B, C, T, H, W] the normalised latent (its kept frames are the condition).
    noise: the run's fixed initial noise, same shape.
    per_token: the model takes per-frame timesteps and keeps t = 0 frames clean.
    """
    mask: torch.Tensor
    known: torch.Tensor
    noise: torch.Tensor
    per_token: bool

    def timestep(self, sigma: float) -> torch.Tensor:
        """The DiT timestep: [B, T] with σ·1000 scaled by each frame's share of generated cells (0 on kept frames)
        for per-token models, else [B] (ComfyUI's Wan 2.2 `process_timestep` does the same)."""
        B, T = self.known.shape[0], self.known.shape[2]
        if self.per_token:
            share = self.mask.expand(B, -1, T, -1, -1).mean(dim=(1, 3, 4))  # [B, T]
            return share * (sigma * 1000.0)
        return torch.full((B,), sigma * 1000.0, device=self.known.device)

    def impose(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Put the kept frames back into `x` at noise level `sigma` (clean for per-token models)."""
        if self.per_token:
            kept = self.known
        else:
            kept = (1.0 - sigma) * self.known + sigma * self.noise
        return x * self.mask + kept * (1.0 - self.mask)

    def clean(self, x0: torch.Tensor) -> torch.Tensor:
        """An x0 prediction with the kept frames shown clean (for previews)."""
        return x0 * self.mask + self.known * (1.0 - self.mask)
