"""CLIP vision: the image encoder Wan 2.1 I2V-14B and FLF2V-14B read their start (and end) image with.

Both nodes use ComfyUI's own types, so they mix with core's: Sora Load CLIP Vision's CLIP_VISION works in core's
CLIPVisionEncode, core's CLIPVisionLoader output works in Sora CLIP Vision Encode, and the CLIP_VISION_OUTPUT of
either goes into Sora Wan Image To Video or core's WanImageToVideo / WanFirstLastFrameToVideo. The file comes from
`models/clip_vision` (`clip_vision_h.safetensors`; open_clip and Wan's own `.pth` layouts are converted on load).
"""
from __future__ import annotations

from ._common import about, category, input_error, mappings
from ._sora import sora
from .loaders import PATH_TOOLTIP, _chosen, _compute_dtype, _source, validate_file

CLIP_VISION, CLIP_VISION_OUTPUT = "CLIP_VISION", "CLIP_VISION_OUTPUT"  # ComfyUI core's socket types


class SoraCLIPVisionLoader:
    DISPLAY_NAME = "Sora Load CLIP Vision"
    DESCRIPTION = ("Loads the CLIP ViT-H/14 image encoder of Wan 2.1 I2V-14B and FLF2V-14B "
                   "(clip_vision_h.safetensors, or an open_clip / Wan .pth file).")
    CATEGORY = category("loaders")
    FUNCTION = "load"
    RETURN_TYPES = (CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (sora.runtime.model_files("clip_vision") or [""], {
                    "tooltip": "A file in the clip_vision folder: clip_vision_h.safetensors for Wan 2.1 image to "
                               "video."}),
                "dtype": (["auto", "fp16", "bf16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Precision of the encoder's matrix products. auto: bf16 on a GPU, fp32 on the "
                               "CPU; the weights stay as stored."}),
            },
            "optional": {"path": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name, path=""):
        return validate_file("clip_vision", clip_name, path, None)

    def load(self, clip_name, dtype, path=""):
        node = type(self)
        if not path.strip() and not clip_name:
            raise input_error(node, "clip_name", clip_name, "is empty: put clip_vision_h.safetensors in "
                                                            "models/clip_vision (or give its path)")
        file = _source(node, "clip_vision", "clip_name", clip_name, path, None, None)
        with about(node, _chosen("clip_name", path)):
            return (sora.model_cache.load(sora.clip_vision.load_clip_vision, file,
                                          compute_dtype=_compute_dtype(dtype)),)


class SoraCLIPVisionEncode:
    DISPLAY_NAME = "Sora CLIP Vision Encode"
    DESCRIPTION = ("Encodes images with CLIP vision into the image tokens Wan 2.1 image-to-video models read "
                   "(257 per image, from the penultimate layer). Connect the output to Sora Wan Image To Video.")
    CATEGORY = category("conditioning")
    FUNCTION = "encode"
    RETURN_TYPES = (CLIP_VISION_OUTPUT,)
    RETURN_NAMES = ("clip_vision_output",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": (CLIP_VISION, {"tooltip": "From Sora Load CLIP Vision (or core's Load CLIP "
                                                         "Vision)."}),
                "image": ("IMAGE", {"tooltip": "The image to encode (the start or the end frame); a batch gives "
                                               "one set of tokens per image."}),
                "crop": (list(sora.clip_vision.CROPS), {
                    "default": "none",
                    "tooltip": "none: the whole image squeezed to 224x224, as the Wan reference encodes it; "
                               "center: the shorter side to 224, then the centre cut out (core's default)."}),
            },
        }

    def encode(self, clip_vision, image, crop):
        node = type(self)
        with about(node, "image"):
            sora.video_io.check_frames(image, "image")
        if not callable(getattr(clip_vision, "encode_image", None)):
            raise input_error(node, "clip_vision", type(clip_vision).__name__,
                              "is not a CLIP vision model; connect Sora Load CLIP Vision")
        with about(node, "clip_vision"):
            if isinstance(clip_vision, sora.clip_vision.CLIPVisionEncoder):
                return (clip_vision.encode_image(image, crop),)
            return (clip_vision.encode_image(image, crop=crop == "center"),)  # core's ClipVisionModel


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraCLIPVisionLoader, SoraCLIPVisionEncode)
