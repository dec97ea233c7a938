"""Text encode: a prompt and a negative prompt -> two CONDITIONING, in ComfyUI core's structure.

Each CONDITIONING is `[[embedding [1, L, D], {"attention_mask": [1, L], ...}]]` with rows past the prompt zero, so
core nodes that take conditioning accept ours, and core's umT5 text encode output drives our sampler.

With the nano model's encoder the prompt is first re-captioned (`sora.nano.recaption`): the user's own words are
rewritten into the caption style the model was trained on, and the node says which concepts it had to guess. A
prompt longer than the encoder's window is cut there, with a note on the node (the Wan reference cuts at 512).
What the node encoded and its notes are shown on it (the pack's web extension shows the "text" it reports).
"""
from __future__ import annotations

import logging

from ._common import about, category, mappings
from ._handles import TEXT_ENCODER
from ._sora import sora

log = logging.getLogger(__name__)
RECAPTION = ("auto", "off")


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
            "optional": {
                "recaption": (list(RECAPTION), {
                    "default": "auto",
                    "tooltip": "auto: with the nano model's encoder (MiniLM), rewrite the prompt into the captions "
                               "nano was trained on ('a crimson ball rolling right' -> 'a red circle moving to "
                               "the right'), saying on the node what it had to guess; with umT5 the prompt is "
                               "encoded as typed. off: always as typed."}),
            },
        }

    def encode(self, text_encoder, prompt, negative_preset, negative_prompt, recaption="auto"):
        node = type(self)
        if recaption not in RECAPTION:
            raise sora.errors.InputError(f"{node.DISPLAY_NAME}: input 'recaption' = {recaption!r} is not one of "
                                         f"{list(RECAPTION)}")
        with about(node, "negative_preset"):
            negative = sora.text.negative_prompt(negative_preset)
        negative = ", ".join(part for part in (negative, negative_prompt.strip()) if part)
        shown, notes = [], []
        if recaption == "auto" and prompt.strip() and getattr(text_encoder, "name", None) == "minilm-l6":
            with about(node, "prompt"):
                result = sora.nano.recaption.recaption_nano(prompt, encoder=text_encoder)
            if result.caption != prompt.strip():
                shown.append(f"encoded: {result.caption}")
            notes += result.notes
            prompt = result.caption
        for name, text in (("prompt", prompt), ("negative prompt", negative)):
            cut = sora.text.truncation(text_encoder, text) if text else None
            if cut:
                notes.append(f"the {name} has {cut}")
        for note in notes:
            log.warning("%s: %s", node.DISPLAY_NAME, note)
        with about(node, "text_encoder"):
            embeds, lengths = sora.text.encode_prompts(text_encoder, [prompt, negative])
            positive_cond, negative_cond = sora.text.to_conditioning(embeds, lengths, text_encoder)
        result = ([positive_cond], [negative_cond])
        if not shown and not notes:
            return result
        return {"ui": {"text": ["\n".join(shown + [f"note: {n}" for n in notes])]}, "result": result}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraTextEncode)
