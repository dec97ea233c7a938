"""Text encode: a prompt and a negative prompt -> two CONDITIONING, in ComfyUI core's structure.

Each CONDITIONING is `[[embedding [1, L, D], {"attention_mask": [1, L], ...}]]` with rows past the prompt zero, so
core nodes that take conditioning accept ours, and core's umT5 text encode output drives our sampler.
"""
from __future__ import annotations

from ._common import about, category, mappings
from ._handles import TEXT_ENCODER
from ._sora import sora


class SoraTextEncode:
    DISPLAY_NAME = "Sora Text Encode"
    DESCRIPTION = "Encodes the prompt and the negative prompt for the sampler (positive and negative conditioning)."
    CATEGORY = category("conditioning")
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")

    @classmethod
    def INPUT_TYPES(cls):
        presets = list(sora.text.NEGATIVE_PRESETS)
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER, {"tooltip": "From Sora Load Text Encoder: umT5 for Wan models, "
                                                           "MiniLM for the nano model."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "What the video shows: subject, motion, camera, light, style."}),
                "negative_preset": (presets, {
                    "default": presets[0],
                    "tooltip": "The start of the negative prompt. 'wan default' is the negative prompt of the Wan "
                               "reference (what to avoid: oversaturation, blur, static frames, ...); 'none' for an "
                               "empty start (the nano model was trained without one)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "More to avoid, added after the preset's text."}),
            },
        }

    def encode(self, text_encoder, prompt, negative_preset, negative_prompt):
        with about(type(self), "negative_preset"):
            negative = sora.text.negative_prompt(negative_preset)
        negative = ", ".join(part for part in (negative, negative_prompt.strip()) if part)
        with about(type(self), "text_encoder"):
            embeds, lengths = sora.text.encode_prompts(text_encoder, [prompt, negative])
            positive_cond, negative_cond = sora.text.to_conditioning(embeds, lengths, text_encoder)
        return ([positive_cond], [negative_cond])


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraTextEncode)
