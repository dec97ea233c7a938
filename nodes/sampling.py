"""The schedule, the empty latent and the sampler.

Frame conditioning reaches the sampler through its `latent` input, the way ComfyUI core does it: a LATENT whose
`noise_mask` is 0 on frames to keep and 1 on frames to generate (the Sora frame-conditioning nodes build it, and so
does core's Wan22ImageToVideoLatent). Wan image-to-video models (I2V-A14B) take their image through `positive`
instead, again as core does: `concat_latent_image` and `concat_mask` in its extras (Sora Wan Image To Video or
core's WanImageToVideo put them there), which become the model's 20 extra input channels.

Progress and latent previews go to ComfyUI's progress bar (tqdm headless), and ComfyUI's cancel button (Ctrl-C
headless) stops the run between two steps.
"""
from __future__ import annotations

import dataclasses
import logging

from ._comfy_sampler import core_sampler
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
from ._handles import DIT
from ._sora import sora

MAX_SEED = 2**64 - 1
log = logging.getLogger(__name__)


class SoraScheduler:
    DISPLAY_NAME = "Sora Scheduler"
    DESCRIPTION = "The noise levels (SIGMAS) the sampler walks, from pure noise (1) to the clean video (0)."
    CATEGORY = category("sampling")
    FUNCTION = "schedule"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The diffusion model; it sets the default shift."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                  "tooltip": "Sampling steps (model evaluations, twice that with guidance). The Wan "
                                             "reference uses 50 (40 for A14B)."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Timestep shift: larger values spend more steps at high noise (more "
                                               "structure, less detail). 0 = the model's reference default (5.0 "
                                               "for Wan 2.1 T2V and TI2V-5B, 12.0 for Wan 2.2 T2V-A14B)."}),
                "schedule": (list(sora.schedules.SCHEDULES), {
                    "default": "wan_unipc",
                    "tooltip": "wan_unipc: the reference grid (starts just below 1); wan_dpm: starts at exactly 1; "
                               "linear: no shift; distill: the grid of the few-step distillation LoRAs (4 steps, "
                               "shift 5 by default: guidance 1, sampler lcm)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 generates from pure noise; lower keeps only the last steps of a "
                                                 "longer schedule (for video-to-video)."}),
            },
        }

    def schedule(self, model, steps, shift, schedule, denoise):
        if shift == 0 and schedule == "distill":
            shift = sora.schedules.DISTILL_SHIFT
        elif shift == 0:
            defaults = model.defaults()
            if defaults is None:
                raise input_error(type(self), "shift", shift, f"asks for the reference default, but {model.name} "
                                                              "has none registered; set the shift by hand")
            shift = defaults.shift
        with about(type(self), "shift"):
            return (sora.schedules.flow_sigmas(steps, shift, schedule, denoise),)


class SoraEmptyLatentVideo:
    DISPLAY_NAME = "Sora Empty Latent Video"
    DESCRIPTION = "An empty video latent of the size and length to generate, with the model's latent channels."
    CATEGORY = category("latent")
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The diffusion model; it sets the latent channels and the size grid."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 8192, "step": 16,
                                  "tooltip": "Video width in pixels: a multiple of 16 for Wan 2.1, 32 for Wan 2.2 "
                                             "TI2V-5B (VAE compression times the 2x2 patch)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 8192, "step": 16,
                                   "tooltip": "Video height in pixels, on the same grid as the width."}),
                "frames": ("INT", {"default": 81, "min": 1, "max": 4097, "step": 4,
                                   "tooltip": "Video frames, 1 + 4k (81 = 5 s at 16 fps for Wan 2.1; 121 at 24 fps "
                                              "for TI2V-5B)."}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64,
                                  "tooltip": "Videos generated at once (each with its own noise)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checked(cls, {"width": (width, video_size(16)), "height": (height, video_size(16)),
                             "frames": (frames, video_frames)})

    def generate(self, model, width, height, frames, batch):
        import torch

        fmt = model.latent_format
        _, ph, pw = model.config.patch_size
        for name, size, patch in (("width", width, pw), ("height", height, ph)):
            size_on_grid(type(self), name, size, fmt.spatial * patch,
                         f"{model.name}: {fmt.spatial}x VAE compression, {ph}x{pw} patches")
        latent_frames = frames_on_grid(type(self), "frames", frames, fmt.temporal)
        samples = torch.zeros(batch, fmt.channels, latent_frames, height // fmt.spatial, width // fmt.spatial)
        return ({"samples": samples},)


class SoraSampler:
    DISPLAY_NAME = "Sora Sampler"
    DESCRIPTION = ("Generates the video latent: denoises `latent` along `sigmas` with classifier-free guidance, "
                   "keeping the frames its noise_mask marks as known; Wan image-to-video models read their start "
                   "image from `positive`. Optionally hands the low-noise steps to a second expert (Wan 2.2 A14B).")
    CATEGORY = category("sampling")
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("latent", "denoised")
    OUTPUT_TOOLTIPS = ("The latent at the last sigma: the video, or with sigmas that stop above 0 the partial "
                       "result another Sora Sampler continues (add_noise off).",
                       "The last step's prediction of the clean video (what a partial run would become).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The diffusion model (the high-noise expert when a second one is "
                                           "connected)."}),
                "positive": ("CONDITIONING", {"tooltip": "What to generate (Sora Text Encode's positive). Wan "
                                                         "image-to-video models: the positive of Sora Wan Image To "
                                                         "Video, which carries the start image."}),
                "negative": ("CONDITIONING", {"tooltip": "What to steer away from (Sora Text Encode's negative)."}),
                "latent": ("LATENT", {"tooltip": "Where to start: an empty latent, a frame condition (its noise_mask "
                                                 "keeps the given frames) or an encoded video for video-to-video."}),
                "sigmas": ("SIGMAS", {"tooltip": "The schedule, from Sora Scheduler (or any SIGMAS node)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "The noise; the same seed gives the same video on every device."}),
                "guidance": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                       "tooltip": "Classifier-free guidance scale: how strongly the prompt is "
                                                  "followed. 1 turns guidance off (twice as fast). Wan reference: "
                                                  "5.0."}),
                "sampler_name": (list(sora.samplers.SAMPLERS), {
                    "default": "unipc",
                    "tooltip": "The solver: unipc (the Wan reference), dpm++_2m, euler (first order), or lcm "
                               "(few-step distilled models: predicts the clean video and noises it afresh)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Run only the last part of the schedule: 1 = all steps; lower "
                                                 "values keep more of the input latent (video-to-video)."}),
            },
            "optional": {
                "model_low_noise": (DIT, {"tooltip": "Wan 2.2 A14B: the low-noise expert, used once the noise "
                                                     "level falls below `boundary`."}),
                "boundary": ("FLOAT", {"default": 0.875, "min": 0.0, "max": 1.0, "step": 0.005,
                                       "tooltip": "Noise level where the low-noise expert takes over (0.875 for "
                                                  "Wan 2.2 T2V, 0.9 for I2V). Used only with model_low_noise."}),
                "guidance_low_noise": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                                 "round": 0.01,
                                                 "tooltip": "Guidance of the low-noise expert (Wan 2.2 T2V: 3.0); "
                                                            "0 = the same as `guidance`."}),
                "add_noise": ("BOOLEAN", {"default": True,
                                          "tooltip": "Add the seed's noise at the first sigma. Turn it off when the "
                                                     "latent is the output of another sampler that stopped early "
                                                     "(split sigmas): this one then continues it."}),
                "sampler": ("SAMPLER", {"tooltip": "Inside ComfyUI: a core sampler (KSamplerSelect: lcm, euler, "
                                                   "res_multistep, er_sde, ...) to use instead of sampler_name."}),
                "cfg_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Fraction of the steps that run guidance; after it each step runs "
                                                 "the positive prompt alone (one forward instead of two). 1 = "
                                                 "guidance on every step (the reference)."}),
                "cfg_zero_star": ("BOOLEAN", {"default": False,
                                              "tooltip": "CFG-Zero*: scale the negative prediction by its optimal "
                                                         "projection onto the positive one before guiding (often "
                                                         "cleaner early structure). Off = plain guidance."}),
                "zero_init_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                            "tooltip": "CFG-Zero*'s zero-init: the first N steps predict nothing "
                                                       "(no forward is run). 0 = off; 1 is the paper's choice."}),
            },
        }

    def sample(self, model, positive, negative, latent, sigmas, seed, guidance, sampler_name, denoise,
               model_low_noise=None, boundary=0.875, guidance_low_noise=0.0, add_noise=True, sampler=None,
               cfg_end=1.0, cfg_zero_star=False, zero_init_steps=0):
        node = type(self)
        samples = latent_samples(node, "latent", latent)
        channels = model.latent_format.channels
        if samples.shape[1] != channels:
            raise input_error(node, "latent", Described(f"LATENT {list(samples.shape)}"),
                              f"has {samples.shape[1]} channels but {model.name} works on {channels}; make the "
                              "latent with this model's empty latent node or its VAE")
        prompts = {name: self._prompts(model, name, cond) for name, cond in (("positive", positive),
                                                                             ("negative", negative))}
        image = self._image_channels(model, positive, samples)
        tokens = self._image_tokens(model, positive, samples)
        vace = self._vace(model, positive, samples)
        if model_low_noise is not None:
            self._check_experts(model, model_low_noise)
        with about(node, "sigmas"):
            steps = len(sora.schedules.split_denoise(sora.schedules.check_sigmas(sigmas), denoise)) - 1
        solver = sampler_name if sampler is None else core_sampler(sampler, seed)
        with sora.runtime.progress(max(steps, 0), "sampling") as bar, about(node, "latent"):
            run = sora.samplers.run_sampling(
                model, samples, sigmas, prompts["positive"], prompts["negative"], guidance=guidance, sampler=solver,
                seed=seed, noise_mask=latent.get("noise_mask"), low_noise_model=model_low_noise,
                boundary_t=boundary * 1000.0, low_noise_guidance=guidance_low_noise or None, denoise=denoise,
                add_noise=add_noise, extra_channels=image, image_tokens=tokens, vace=vace,
                callback=_progress_callback(bar, model.latent_format),
                interrupt=sora.runtime.check_interrupt, device=sora.memory.get_manager().compute_device,
                cfg_end=cfg_end, cfg_zero_star=cfg_zero_star, zero_init_steps=zero_init_steps)
        outputs = ({**latent, "samples": run.latent}, {**latent, "samples": run.denoised})
        return tuple(sora.vace.drop_reference_frames(out) for out in outputs)  # VACE references are not video

    def _prompts(self, model, name: str, cond):
        """The prompts of one CONDITIONING input (one per entry), checked against the model's text width."""
        node = type(self)
        with about(node, name):
            entries = sora.text.from_conditioning(cond)
        width = entries[0].context.shape[-1]
        if width != model.config.text_dim:
            raise input_error(node, name, Described(f"CONDITIONING of width {width}"),
                              f"does not fit {model.name}, which reads {model.config.text_dim}-wide text "
                              "states; encode the prompt with the text encoder that belongs to the model")
        limit = getattr(model.config, "text_len", None)
        if limit and any(e.context[:, limit:].any() for e in entries):  # more text than the model reads
            longest = max(e.context.shape[1] for e in entries)
            log.warning("%s: input '%s' holds up to %d text tokens, but %s reads %d; the rest is left out",
                        node.DISPLAY_NAME, name, longest, model.name, limit)
        if limit:
            entries = [dataclasses.replace(e, context=e.context[:, :limit]) for e in entries]
        return entries

    def _image_channels(self, model, positive, samples):
        """The extra input channels of a Wan image-to-video model (in_dim = latent channels + 20), built from the
        image condition `positive` carries (ours or core's WanImageToVideo); None for other models. Both experts
        and both guidance passes get the same channels (ARCH_FACTS §4.7, §4.9)."""
        node, fmt = type(self), model.latent_format
        with about(node, "positive"):
            condition = sora.conditioning.image_condition(positive)
        extra = model.config.in_dim - fmt.channels
        if extra == 0:
            if condition is not None:
                raise input_error(node, "positive", Described("CONDITIONING with an image condition"),
                                  f"(concat_latent_image), but {model.name} takes no image channels; connect the "
                                  "text encode's positive directly (for image to video with this model use Sora "
                                  "Image To Video), or load a Wan image-to-video model such as Wan 2.2 I2V-A14B")
            return None
        if condition is None:
            raise input_error(node, "model", model.name,
                              f"is a Wan image-to-video model ({model.config.in_dim} input channels: the latent "
                              f"and {extra} of the start image), but 'positive' carries no image condition; run "
                              "positive and negative through Sora Wan Image To Video (or core's WanImageToVideo) "
                              "and connect its positive, negative and latent outputs here")
        with about(node, "positive"):
            channels = sora.conditioning.wan_i2v_concat(*condition, fmt)
        if channels.shape[2:] != samples.shape[2:] or channels.shape[0] not in (1, samples.shape[0]):
            raise input_error(node, "latent", Described(f"LATENT {list(samples.shape)}"),
                              f"does not match the image condition in 'positive' (its latent is "
                              f"{list(condition[0].shape)}); connect the latent output of the same Sora Wan Image "
                              "To Video node, or give it this latent's size and frames")
        return channels

    def _image_tokens(self, model, positive, samples):
        """The CLIP image tokens [B or 1, N, image_dim] of a Wan 2.1 I2V / FLF2V model, from the CLIP vision
        output `positive` carries (ours or core's Wan image-to-video nodes put it there); None for other models,
        which ignore a CLIP vision output with a warning (Wan 2.2 I2V-A14B reads only the image channels)."""
        node = type(self)
        with about(node, "positive"):
            tokens = sora.conditioning.image_tokens(positive)
        width = getattr(model.config, "image_dim", None)
        if width is None:
            if tokens is not None:
                log.warning("%s: %s has no CLIP image branch (a Wan 2.1 I2V / FLF2V model has one); the "
                            "clip_vision_output in 'positive' is ignored", node.DISPLAY_NAME, model.name)
            return None
        if tokens is None:
            raise input_error(node, "positive", Described("CONDITIONING without CLIP image tokens"),
                              f"but {model.name} is a Wan 2.1 {model.config.model_type.upper()} model, which reads "
                              "the start image through CLIP vision too; connect Sora CLIP Vision Encode (start "
                              "image) to Sora Wan Image To Video's clip_vision_start_image (and the end image's "
                              "to clip_vision_end_image for FLF2V)")
        if tokens.shape[-1] != width:
            raise input_error(node, "positive", Described(f"CLIP image tokens {list(tokens.shape)}"),
                              f"are {tokens.shape[-1]} wide but {model.name} reads {width}-wide ones (CLIP ViT-H/14, "
                              "clip_vision_h.safetensors); encode the image with that model")
        batch = samples.shape[0]
        if tokens.shape[0] not in (1, batch):
            if tokens.shape[0] < batch:
                raise input_error(node, "positive", Described(f"CLIP image tokens {list(tokens.shape)}"),
                                  f"have {tokens.shape[0]} images for a batch of {batch}; encode one image (it is "
                                  "shared) or one per video")
            tokens = tokens[:batch]  # as core: the first `batch` of them
        return tokens

    def _vace(self, model, positive, samples):
        """The VACE contexts [1 | B, 96, T, h, w] with their strengths of a Wan VACE model, from the VACE inputs
        `positive` carries (Sora VACE Encode or core's WanVaceToVideo); without any, ComfyUI's default input.
        Other models refuse VACE inputs."""
        node, fmt = type(self), model.latent_format
        with about(node, "positive"):
            inputs = sora.vace.from_conditioning(positive)
        if not getattr(model.config, "vace_layers", ()):
            if inputs:
                raise input_error(node, "positive", Described("CONDITIONING with a VACE input"),
                                  f"but {model.name} has no VACE branch; load a Wan VACE model (e.g. "
                                  "wan2.1_vace_1.3B_fp16.safetensors) or connect the text encode's outputs")
            return ()
        inputs = inputs or [sora.vace.default_input(samples.shape)]
        for n, entry in enumerate(inputs):
            if entry.frames.shape[2:] != samples.shape[2:] or entry.frames.shape[0] not in (1, samples.shape[0]):
                raise input_error(node, "latent", Described(f"LATENT {list(samples.shape)}"),
                                  f"does not match VACE input {n + 1} in 'positive' (its latents are "
                                  f"{list(entry.frames.shape)}); connect the latent output of the same VACE "
                                  "encode node")
        return [(sora.vace.context(entry, fmt), entry.strength) for entry in inputs]

    def _check_experts(self, high, low):
        if high.expert == sora.handle.LOW_NOISE or low.expert == sora.handle.HIGH_NOISE:
            raise input_error(type(self), "model_low_noise", low.name,
                              f"is the {low.expert} expert while 'model' is the {high.expert} one; connect the "
                              "high-noise expert to 'model' and the low-noise expert to 'model_low_noise'")
        if high.config.latent_format != low.config.latent_format or high.config.in_dim != low.config.in_dim:
            raise input_error(type(self), "model_low_noise", low.name,
                              f"does not pair with {high.name}; the two experts must come from one release")


def _progress_callback(bar, fmt):
    """The sampler's per-step callback: advance the progress bar, with a latent preview when one is shown."""
    def step(done: int, total: int, x0) -> None:
        preview = None
        if sora.runtime.wants_previews():
            from PIL import Image  # ComfyUI ships Pillow; previews exist only there
            rgb = sora.preview.preview_frame(x0, fmt, frame=-1)
            preview = Image.fromarray((rgb * 255).round().byte().cpu().numpy())
        bar.update(1, preview)
    return step


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraScheduler, SoraEmptyLatentVideo, SoraSampler)
