"""Frame conditioning: known frames plus frames to generate, as one LATENT for the sampler.

Every node here returns ComfyUI's conditioned latent: `samples` with the known frames in place and a `noise_mask`
that is 0 on them and 1 on the frames to generate. Wire it into Sora Sampler's `latent`; the sampler returns the
known frames unchanged. Lengths are in video frames: one latent frame holds 4 of them (the first holds 1), so new
frames and overlaps come in multiples of 4, and a whole clip has 1 + 4k frames.

Long clips: generate a clip, extend it forward (overlap = the last frames it continues from), sample the part, and
join clip and parts with Sora Join Clips using the same overlap; each overlap is kept once.

The exception is Sora Wan Image To Video, for the Wan models that take their image through extra input channels
(Wan 2.2 I2V-A14B): like core's WanImageToVideo it puts the encoded image into the positive and negative
CONDITIONING and returns an empty latent; the sampler reads the image from there.
"""
from __future__ import annotations

from ._common import (
    about,
    category,
    checked,
    continuing_frames,
    frames_on_grid,
    input_error,
    latent_samples,
    mappings,
    size_on_grid,
    video_frames,
    video_size,
    whole_latent_frames,
)
from ._handles import VAE
from ._sora import sora
from .vae_codec import AUTO
from .vae_codec import _run as run_vae

OVERLAP = ("INT", {"default": 16, "min": 4, "max": 4096, "step": 4,
                   "tooltip": "Video frames the clip and the new part share (a multiple of 4): the part continues "
                              "from them. More overlap gives smoother motion across the join, fewer new frames "
                              "per pass."})
NEW_FRAMES = ("INT", {"default": 64, "min": 4, "max": 4096, "step": 4,
                      "tooltip": "Video frames to generate (a multiple of 4)."})


def _condition(node: type, build, clips: dict, overlap_frames: int, new_frames: int) -> tuple[dict]:
    """Run a `sora.conditioning` builder on the clips' samples with the counts in latent frames."""
    samples = {name: latent_samples(node, name, latent) for name, latent in clips.items()}
    first = next(iter(clips))
    with about(node, first):
        temporal = sora.latent_formats.temporal_factor(samples[first].shape[1])
    overlap = whole_latent_frames(node, "overlap_frames", overlap_frames, temporal)
    new = whole_latent_frames(node, "new_frames", new_frames, temporal)
    for name, clip in samples.items():
        if overlap > clip.shape[2]:
            raise input_error(node, "overlap_frames", overlap_frames,
                              f"needs {overlap} latent frames but '{name}' has only {clip.shape[2]} "
                              f"({temporal * (clip.shape[2] - 1) + 1} video frames); use at most "
                              f"{temporal * clip.shape[2]}")
    with about(node, first):
        return (build(*samples.values(), overlap, new),)


class SoraExtendForward:
    DISPLAY_NAME = "Sora Extend Forward"
    DESCRIPTION = ("Continues a clip: a new part that starts with the clip's last frames (kept) followed by new "
                   "frames to generate. Join the clip and the sampled part with Sora Join Clips.")
    CATEGORY = category("frames")
    FUNCTION = "extend"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("condition",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("LATENT", {"tooltip": "The clip to continue (a sampled or VAE-encoded "
                                                            "video latent)."}),
                             "overlap_frames": OVERLAP, "new_frames": NEW_FRAMES}}

    @classmethod
    def VALIDATE_INPUTS(cls, overlap_frames=None, new_frames=None):
        return checked(cls, {"overlap_frames": (overlap_frames, continuing_frames),
                             "new_frames": (new_frames, continuing_frames)})

    def extend(self, clip, overlap_frames, new_frames):
        return _condition(type(self), sora.conditioning.extend_forward, {"clip": clip}, overlap_frames, new_frames)


class SoraExtendBackward:
    DISPLAY_NAME = "Sora Extend Backward"
    DESCRIPTION = ("Leads into a clip: new frames to generate followed by the clip's first frames (kept). Join the "
                   "sampled part and the clip (part first) with Sora Join Clips.")
    CATEGORY = category("frames")
    FUNCTION = "extend"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("condition",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("LATENT", {"tooltip": "The clip to lead into."}),
                             "overlap_frames": OVERLAP, "new_frames": NEW_FRAMES}}

    @classmethod
    def VALIDATE_INPUTS(cls, overlap_frames=None, new_frames=None):
        return checked(cls, {"overlap_frames": (overlap_frames, continuing_frames),
                             "new_frames": (new_frames, continuing_frames)})

    def extend(self, clip, overlap_frames, new_frames):
        return _condition(type(self), sora.conditioning.extend_backward, {"clip": clip}, overlap_frames, new_frames)


class SoraConnect:
    DISPLAY_NAME = "Sora Connect Clips"
    DESCRIPTION = ("Bridges two clips: the end of the first (kept), new frames to generate, the start of the second "
                   "(kept). Join first, sampled bridge and second with Sora Join Clips.")
    CATEGORY = category("frames")
    FUNCTION = "connect"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("condition",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"first": ("LATENT", {"tooltip": "The clip that plays before the bridge."}),
                             "second": ("LATENT", {"tooltip": "The clip that plays after the bridge."}),
                             "overlap_frames": OVERLAP, "new_frames": NEW_FRAMES}}

    @classmethod
    def VALIDATE_INPUTS(cls, overlap_frames=None, new_frames=None):
        return checked(cls, {"overlap_frames": (overlap_frames, continuing_frames),
                             "new_frames": (new_frames, continuing_frames)})

    def connect(self, first, second, overlap_frames, new_frames):
        return _condition(type(self), sora.conditioning.connect, {"first": first, "second": second},
                          overlap_frames, new_frames)


class SoraLoop:
    DISPLAY_NAME = "Sora Loop Clip"
    DESCRIPTION = ("Frames that lead from a clip's end back into its start. Join the clip and the sampled bridge "
                   "with Sora Join Clips (loop on) for a clip that plays seamlessly on repeat.")
    CATEGORY = category("frames")
    FUNCTION = "loop"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("condition",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("LATENT", {"tooltip": "The clip to loop."}),
                             "overlap_frames": OVERLAP, "new_frames": NEW_FRAMES}}

    @classmethod
    def VALIDATE_INPUTS(cls, overlap_frames=None, new_frames=None):
        return checked(cls, {"overlap_frames": (overlap_frames, continuing_frames),
                             "new_frames": (new_frames, continuing_frames)})

    def loop(self, clip, overlap_frames, new_frames):
        return _condition(type(self), sora.conditioning.loop, {"clip": clip}, overlap_frames, new_frames)


class SoraImageToVideo:
    DISPLAY_NAME = "Sora Image To Video"
    DESCRIPTION = ("Animates an image: the VAE-encoded image becomes the first frame (kept) of a clip of `frames` "
                   "video frames. Best with models trained for it (Wan 2.2 TI2V-5B, nano).")
    CATEGORY = category("frames")
    FUNCTION = "condition"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("condition",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "start": ("LATENT", {"tooltip": "The start image encoded with Sora VAE Encode (one frame; several "
                                            "frames 1 + 4k are kept as the clip's beginning)."}),
            "frames": ("INT", {"default": 121, "min": 5, "max": 4097, "step": 4,
                               "tooltip": "Video frames of the whole clip, 1 + 4k (121 = 5 s at 24 fps)."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, frames=None):
        return checked(cls, {"frames": (frames, video_frames)})

    def condition(self, start, frames):
        samples = latent_samples(type(self), "start", start)
        with about(type(self), "start"):
            temporal = sora.latent_formats.temporal_factor(samples.shape[1])
        latent_frames = frames_on_grid(type(self), "frames", frames, temporal)
        if latent_frames <= samples.shape[2]:
            raise input_error(type(self), "frames", frames,
                              f"leaves nothing to generate after the {samples.shape[2]} given latent frame(s); use "
                              f"at least {temporal * samples.shape[2] + 1}")
        with about(type(self), "start"):
            return (sora.conditioning.image_to_video(samples, latent_frames),)


class SoraWanImageToVideo:
    DISPLAY_NAME = "Sora Wan Image To Video"
    DESCRIPTION = ("Image to video for Wan image-to-video models (Wan 2.1 I2V-14B, FLF2V-14B, Wan 2.2 "
                   "I2V-A14B): the start image (and optionally an end image) is resized into the first (last) "
                   "frame of a mid-gray video, encoded, and added to the positive and negative conditioning with "
                   "the images' CLIP vision tokens (Wan 2.1), as core's WanImageToVideo and "
                   "WanFirstLastFrameToVideo do. Connect all three outputs to Sora Sampler.")
    CATEGORY = category("frames")
    FUNCTION = "condition"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Sora Text Encode's positive."}),
                "negative": ("CONDITIONING", {"tooltip": "Sora Text Encode's negative."}),
                "vae": (VAE, {"tooltip": "The model's VAE (Wan 2.1 VAE for I2V-A14B)."}),
                "start_image": ("IMAGE", {"tooltip": "The first frame. It is resized to cover width x height and "
                                                     "centre-cropped; several frames are kept as the clip's "
                                                     "beginning."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 8192, "step": 16,
                                  "tooltip": "Video width in pixels, a multiple of 16 (832 for 480p, 1280 for "
                                             "720p)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 8192, "step": 16,
                                   "tooltip": "Video height in pixels, a multiple of 16 (480 or 720)."}),
                "frames": ("INT", {"default": 81, "min": 5, "max": 4097, "step": 4,
                                   "tooltip": "Video frames of the whole clip, 1 + 4k (81 = 5 s at 16 fps)."}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64,
                                  "tooltip": "Videos generated at once from the same image (each with its own "
                                             "noise)."}),
            },
            "optional": {
                "end_image": ("IMAGE", {"tooltip": "Optional last frame (first-last-frame): the clip ends on it."}),
                "clip_vision_start_image": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "Wan 2.1 I2V-14B / FLF2V-14B: the start image encoded by Sora CLIP Vision Encode "
                               "(the model reads it through its image tokens). Not used by Wan 2.2."}),
                "clip_vision_end_image": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "FLF2V-14B: the end image encoded by Sora CLIP Vision Encode (joined after the "
                               "start image's tokens)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checked(cls, {"width": (width, video_size(16)), "height": (height, video_size(16)),
                             "frames": (frames, video_frames)})

    def condition(self, positive, negative, vae, start_image, width, height, frames, batch, end_image=None,
                  clip_vision_start_image=None, clip_vision_end_image=None):
        node = type(self)
        latent_frames = frames_on_grid(node, "frames", frames, vae.config.temporal_factor)
        s = vae.config.spatial_factor
        patch = sora.dit.WAN_PATCH[1]  # the Wan image-to-video DiTs this feeds
        for name, size in (("width", width), ("height", height)):
            size_on_grid(node, name, size, s * patch, f"{s}x VAE compression, {patch}x{patch} patches")
        clips = {}
        for name, image in (("start_image", start_image), ("end_image", end_image)):
            if image is not None:
                with about(node, name):
                    sora.video_io.check_frames(image, name)
                clips[name] = sora.video_io.frames_to_clip(image)
        with about(node, "frames"):
            video, known = sora.conditioning.wan_i2v_video(frames, height, width, clips["start_image"],
                                                           clips.get("end_image"))
        with about(node, "vae"):
            encoded = run_vae(node, vae, video, AUTO, 0, 0, encode=True, what="encoding")
        mask = sora.conditioning.wan_i2v_mask(known, latent_frames, height // s, width // s,
                                              vae.config.temporal_factor)
        empty = encoded.new_zeros(batch, encoded.shape[1], *encoded.shape[2:])
        tokens = self._clip_vision(clip_vision_start_image, clip_vision_end_image)
        return (sora.conditioning.with_image_condition(positive, encoded, mask, tokens),
                sora.conditioning.with_image_condition(negative, encoded, mask, tokens), {"samples": empty})

    def _clip_vision(self, start, end):
        """The CLIP vision output the model reads: the start image's, followed by the end image's (FLF2V)."""
        node = type(self)
        given = {name: out for name, out in (("clip_vision_start_image", start), ("clip_vision_end_image", end))
                 if out is not None}
        for name, out in given.items():
            if not hasattr(out, "penultimate_hidden_states"):
                raise input_error(node, name, type(out).__name__, "is not a CLIP vision output; connect Sora CLIP "
                                                                  "Vision Encode")
        if end is not None and start is None:
            raise input_error(node, "clip_vision_end_image", "CLIP_VISION_OUTPUT",
                              "is given without clip_vision_start_image; FLF2V reads the start image's tokens "
                              "first, so encode the start image too")
        if len(given) < 2:
            return start
        with about(node, "clip_vision_end_image"):
            return sora.clip_vision.concat_outputs(start, end)


class SoraVideoToVideo:
    DISPLAY_NAME = "Sora Video To Video"
    DESCRIPTION = ("Restyles a video: sampling starts from the encoded video noised to `strength`, using only the "
                   "last part of the schedule. Returns the latent and the shortened sigmas for the sampler.")
    CATEGORY = category("frames")
    FUNCTION = "condition"
    RETURN_TYPES = ("LATENT", "SIGMAS")
    RETURN_NAMES = ("latent", "sigmas")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video": ("LATENT", {"tooltip": "The source video, encoded with Sora VAE Encode."}),
            "sigmas": ("SIGMAS", {"tooltip": "The full schedule from Sora Scheduler."}),
            "strength": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "How much changes: 0 returns the video as it is, 1 ignores it; "
                                              "0.5-0.8 keeps the layout and motion and restyles the look."})}}

    def condition(self, video, sigmas, strength):
        samples = latent_samples(type(self), "video", video)
        with about(type(self), "sigmas"):
            sigmas = sora.schedules.check_sigmas(sigmas)
        with about(type(self), "strength"):
            latent, tail = sora.conditioning.video_to_video(samples, sigmas, strength)
        return (latent, tail)


class SoraJoinClips:
    DISPLAY_NAME = "Sora Join Clips"
    DESCRIPTION = ("Joins a clip and the parts sampled from it into one latent, keeping each overlap once: forward "
                   "extensions in order (clip, part 1, part 2, ...), a backward one part first, a connection as "
                   "first, bridge, second; turn on loop for a looping bridge.")
    CATEGORY = category("frames")
    FUNCTION = "join"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)

    @classmethod
    def INPUT_TYPES(cls):
        part = ("LATENT", {"tooltip": "A further part, continuing the previous one."})
        return {
            "required": {
                "part_1": ("LATENT", {"tooltip": "The first piece in playing order."}),
                "part_2": ("LATENT", {"tooltip": "The piece that continues part_1 (made from it)."}),
                "overlap_frames": (OVERLAP[0], {**OVERLAP[1], "tooltip": "The overlap used to make the parts "
                                                                         "(video frames, a multiple of 4)."}),
                "loop": ("BOOLEAN", {"default": False,
                                     "tooltip": "On when the last part leads back into part_1 (Sora Loop Clip)."}),
            },
            "optional": {"part_3": part, "part_4": part},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, overlap_frames=None):
        return checked(cls, {"overlap_frames": (overlap_frames, continuing_frames)})

    def join(self, part_1, part_2, overlap_frames, loop, part_3=None, part_4=None):
        node = type(self)
        parts = {name: p for name, p in (("part_1", part_1), ("part_2", part_2), ("part_3", part_3),
                                         ("part_4", part_4)) if p is not None}
        samples = [latent_samples(node, name, p) for name, p in parts.items()]
        with about(node, "part_1"):
            temporal = sora.latent_formats.temporal_factor(samples[0].shape[1])
        overlap = whole_latent_frames(node, "overlap_frames", overlap_frames, temporal)
        with about(node, "part_2"):
            return ({"samples": sora.conditioning.join(samples, overlap, loop=loop)},)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(
    SoraExtendForward, SoraExtendBackward, SoraConnect, SoraLoop, SoraImageToVideo, SoraWanImageToVideo,
    SoraVideoToVideo, SoraJoinClips)
