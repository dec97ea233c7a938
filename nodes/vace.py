"""VACE: one Wan model follows a control video, keeps a subject from reference images, inpaints masked regions,
and extends or joins clips.

Sora VACE Encode adds a VACE input to the positive and negative CONDITIONING in core's structure (`vace_frames`,
`vace_mask`, `vace_strength`, appended, so chained nodes stack inputs) and returns the latent to sample. Core's
WanVaceToVideo conditioning drives Sora Sampler the same way. Reference images become extra latent frames in
front of the video; Sora Sampler drops them from its outputs (the latent says how many in `reference_frames`).
With core's node, trim them with core's TrimVideoLatent, as core's workflows do.

Extension and joining: connect Sora Extend Forward / Extend Backward / Connect Clips / Loop Clip's condition to
`condition`; the kept frames become the VACE input (kept where the condition keeps them, generated elsewhere)
and the sampler also keeps them as it does for any model.
"""
from __future__ import annotations

from ._common import (
    Described,
    about,
    category,
    checked,
    frames_on_grid,
    input_error,
    latent_samples,
    mappings,
    size_on_grid,
    video_frames,
    video_size,
)
from ._handles import VAE
from ._sora import sora
from .vae_codec import AUTO
from .vae_codec import _run as run_vae

VACE_PATCH = 2  # the Wan DiT's 2x2 spatial patch


class SoraVaceEncode:
    DISPLAY_NAME = "Sora VACE Encode"
    DESCRIPTION = ("For Wan VACE models: a control video (pose, depth, edges, a rough animation, or frames to "
                   "keep), a mask of what to generate and reference images become the model's VACE input in the "
                   "positive and negative conditioning, as core's WanVaceToVideo does; or the kept frames of an "
                   "extension (connect a frame condition). Connect all three outputs to Sora Sampler.")
    CATEGORY = category("frames")
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Sora Text Encode's positive (or another VACE Encode's: "
                                                         "inputs stack)."}),
                "negative": ("CONDITIONING", {"tooltip": "Sora Text Encode's negative."}),
                "vae": (VAE, {"tooltip": "The Wan 2.1 VAE (VACE models use it)."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 8192, "step": 16,
                                  "tooltip": "Video width in pixels, a multiple of 16 (ignored with a condition)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 8192, "step": 16,
                                   "tooltip": "Video height in pixels, a multiple of 16 (ignored with a "
                                              "condition)."}),
                "frames": ("INT", {"default": 81, "min": 1, "max": 4097, "step": 4,
                                   "tooltip": "Video frames, 1 + 4k (ignored with a condition)."}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64,
                                  "tooltip": "Videos generated at once (each with its own noise)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                       "tooltip": "How strongly the model follows the VACE input (Wan's context "
                                                  "scale): 1 as trained, 0 ignores it."}),
            },
            "optional": {
                "control_video": ("IMAGE", {"tooltip": "The control frames (pose, depth, edges, a rough "
                                                       "animation, or frames to keep), resized to cover width x "
                                                       "height and centre-cropped; missing frames are gray."}),
                "control_masks": ("MASK", {"tooltip": "Where to generate (1) and where to keep the control video "
                                                      "(0), per frame; one mask applies to every frame; missing "
                                                      "frames are 1. Default: generate everywhere, following the "
                                                      "control video."}),
                "reference_image": ("IMAGE", {"tooltip": "Images of a subject or style to keep (each one a "
                                                         "reference); they are not part of the output."}),
                "condition": ("LATENT", {"tooltip": "A frame condition (Sora Extend Forward / Backward, Connect "
                                                    "Clips, Loop Clip): its kept frames become the VACE input and "
                                                    "its size the video's. Instead of a control video."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checked(cls, {"width": (width, video_size(16)), "height": (height, video_size(16)),
                             "frames": (frames, video_frames)})

    def encode(self, positive, negative, vae, width, height, frames, batch, strength, control_video=None,
               control_masks=None, reference_image=None, condition=None):
        node = type(self)
        fmt = sora.latent_formats.format_of("wan21")
        if vae.config.z_dim != fmt.channels or vae.config.spatial_factor != sora.vace.MASK_CELL:
            raise input_error(node, "vae", Described(f"VAE with {vae.config.z_dim} latent channels"),
                              "is not the Wan 2.1 VAE, which Wan VACE models use; load wan_2.1_vae.safetensors")
        if condition is not None:
            if control_video is not None or control_masks is not None:
                raise input_error(node, "condition", Described("LATENT"),
                                  "comes with a control video or mask; give one or the other (the condition's "
                                  "kept frames are its control video)")
            latent, vace_frames, mask = self._from_condition(vae, condition, fmt)
        else:
            latent, vace_frames, mask = self._from_video(vae, width, height, frames, batch, control_video,
                                                         control_masks)
        if reference_image is not None:
            latent, vace_frames, mask = self._add_references(vae, reference_image, latent, vace_frames, mask, fmt)
        entry = sora.vace.VaceInput(vace_frames, mask, float(strength))
        return sora.vace.with_input(positive, entry), sora.vace.with_input(negative, entry), latent

    def _encode(self, video, vae):
        """Raw latent [1, 16, T, h, w] of a clip [1, 3, F, H, W] in -1..1."""
        with about(type(self), "vae"):
            return run_vae(type(self), vae, video, AUTO, 0, 0, encode=True, what="encoding")

    def _from_video(self, vae, width, height, frames, batch, control_video, control_masks):
        import torch

        node = type(self)
        cell = sora.vace.MASK_CELL
        for name, size in (("width", width), ("height", height)):
            size_on_grid(node, name, size, cell * VACE_PATCH, f"{cell}x VAE compression, 2x2 patches")
        latent_frames = frames_on_grid(node, "frames", frames, vae.config.temporal_factor)
        video = torch.zeros(1, 3, frames, height, width)  # gray where no control frame is given
        if control_video is not None:
            with about(node, "control_video"):
                sora.video_io.check_frames(control_video, "control_video")
                clip = sora.video_io.frames_to_clip(control_video[:frames])
                video[:, :, :clip.shape[2]] = sora.conditioning.fit_frames(clip, height, width)
        mask = torch.ones(frames, height, width)
        if control_masks is not None:
            given = control_masks if control_masks.ndim == 3 else control_masks[None]
            if given.ndim != 3:
                raise input_error(node, "control_masks", Described(f"MASK {list(control_masks.shape)}"),
                                  "is not a mask [frames, height, width]")
            if given.shape[0] == 1:  # one mask for every frame
                given = given.expand(frames, -1, -1)
            fitted = sora.conditioning.fit_frames(given[:frames][None, None].float(), height, width)[0, 0]
            mask[:fitted.shape[0]] = fitted.clamp(0, 1)  # [N, H, W]
        inactive, reactive = sora.vace.control_videos(video, mask)
        vace_frames = torch.cat([self._encode(inactive, vae), self._encode(reactive, vae)], dim=1)
        mask_channels = sora.vace.mask_channels(mask, latent_frames)
        samples = torch.zeros(batch, 16, latent_frames, height // cell, width // cell)
        return {"samples": samples}, vace_frames, mask_channels

    def _from_condition(self, vae, condition, fmt):
        import torch

        node = type(self)
        samples = latent_samples(node, "condition", condition)
        if samples.shape[1] != fmt.channels:
            raise input_error(node, "condition", Described(f"LATENT {list(samples.shape)}"),
                              f"has {samples.shape[1]} channels; VACE models take Wan 2.1 latents ({fmt.channels})")
        T, h, w = samples.shape[2:]
        cell = sora.vace.MASK_CELL
        frames = vae.config.temporal_factor * (T - 1) + 1
        gray = self._encode(torch.zeros(1, 3, frames, h * cell, w * cell), vae)
        with about(node, "condition"):
            vace_frames, mask = sora.vace.known_frames(samples, condition.get("noise_mask"), gray)
        return dict(condition), vace_frames, mask

    def _add_references(self, vae, images, latent, vace_frames, mask, fmt):
        import torch

        node = type(self)
        with about(node, "reference_image"):
            sora.video_io.check_frames(images, "reference_image")
        h, w = vace_frames.shape[3:]
        cell = sora.vace.MASK_CELL
        encoded = []
        for image in images:  # each image one latent frame of its own
            clip = sora.conditioning.fit_frames(sora.video_io.frames_to_clip(image[None]), h * cell, w * cell)
            encoded.append(self._encode(clip, vae))
        references = sora.vace.reference_frames(torch.cat(encoded, dim=2), fmt)
        vace_frames, mask = sora.vace.with_references(vace_frames, mask, references)
        n = references.shape[2]
        samples = latent["samples"]
        latent = {**latent, "samples": torch.cat([samples.new_zeros(*samples.shape[:2], n, *samples.shape[3:]),
                                                  samples], dim=2),
                  "reference_frames": latent.get("reference_frames", 0) + n}
        if latent.get("noise_mask") is not None:
            noise_mask = latent["noise_mask"]
            if noise_mask.shape[2] == samples.shape[2]:
                latent["noise_mask"] = torch.cat([noise_mask.new_ones(*noise_mask.shape[:2], n,
                                                                      *noise_mask.shape[3:]), noise_mask], dim=2)
        return latent, vace_frames, mask


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraVaceEncode)
