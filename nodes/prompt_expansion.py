"""Prompt expansion: a short prompt -> a detailed caption (STRING) to read, edit, or wire into text encode.

The caption is also shown on the node in the editor (the pack's web extension displays the "text" the node
reports). The "wan" preset rewrites with a local chat model (the embedded SmolLM2-135M by default, or one from the
`LLM` / `text_encoders` folders), which is released again after use; the "nano" preset maps the prompt onto the
nano model's vocabulary without any model.
"""
from __future__ import annotations

from pathlib import Path

from ._common import about, category, input_error, mappings
from ._sora import sora

EMBEDDED = "smollm2-135m (embedded)"
MAX_SEED = 2**64 - 1
MODEL_FOLDERS = ("LLM", "text_encoders")
# The model may write about max_length / 3 tokens (English runs about 4 characters a token): enough to fill the
# length, and no time spent on text that would be cut.
CHARS_PER_TOKEN, TOKENS_MIN = 3, 16


def _chat_models() -> dict[str, Path]:
    """Chat models in the LLM and text_encoders folders, by the name shown in the list."""
    found = {}
    for kind in MODEL_FOLDERS:
        for path in sora.prompt_expansion.find_chat_models(sora.runtime.model_folders(kind)):
            found.setdefault(path.name, path)
    return found


class SoraPromptExpansion:
    DISPLAY_NAME = "Sora Prompt Expansion"
    DESCRIPTION = ("Rewrites a short prompt as the detailed caption a video model was trained on (subject, motion, "
                   "camera, light, style). Deterministic for a seed. Connect it to Sora Text Encode's prompt.")
    CATEGORY = category("conditioning")
    FUNCTION = "expand"
    OUTPUT_NODE = True  # runs (and shows its caption) even before it is wired to an encoder
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("expanded_prompt",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "A few words, e.g. 'a cat surfing at sunset'."}),
            "preset": (list(sora.prompt_expansion.PRESETS), {
                "default": "wan",
                "tooltip": "wan: one detailed paragraph written by a chat model, for Wan models. nano: the nano "
                           "model's fixed vocabulary (colour, shape, motion, speed, background), no model needed."}),
            "model": ([EMBEDDED, *_chat_models()], {
                "default": EMBEDDED,
                "tooltip": "The chat model for the wan preset: the embedded SmolLM2-135M-Instruct, or a model "
                           "folder / .gguf file in models/LLM or models/text_encoders (e.g. Qwen2.5-Instruct)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                             "tooltip": "Same seed, same caption. With nano it picks what the prompt leaves open."}),
            "creativity": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05,
                                     "tooltip": "0: the most literal rewrite (greedy); up to 1: more varied."}),
            "max_length": ("INT", {"default": 800, "min": 20, "max": 8000,
                                   "tooltip": "The most characters of the caption, cut at a sentence end."}),
        }}

    def expand(self, prompt, preset, model, seed, creativity, max_length):
        node = type(self)
        if not prompt.strip():
            raise input_error(node, "prompt", prompt, "is empty; type a few words describing the video")
        chat = None
        if preset == "wan":
            chat = self._chat_model(model)
        try:
            with about(node, "prompt"):
                caption = sora.prompt_expansion.expand_prompt(
                    prompt, model=chat, preset=preset, seed=seed, creativity=creativity, max_chars=max_length,
                    max_new_tokens=max(TOKENS_MIN, max_length // CHARS_PER_TOKEN))
        finally:
            if chat is not None:
                chat.release()  # a chat model is needed once per prompt; give its memory back to the video models
        return {"ui": {"text": [caption]}, "result": (caption,)}

    def _chat_model(self, name: str):
        with about(type(self), "model"):
            if name == EMBEDDED:
                path = sora.prompt_expansion.default_model_path()
            else:
                models = _chat_models()
                if name not in models:
                    raise input_error(type(self), "model", name, f"is not in {' or '.join(MODEL_FOLDERS)}; "
                                                                 f"{sora.prompt_expansion.WHERE_TO_PUT_MODELS}")
                path = models[name]
            return sora.model_cache.load(sora.prompt_expansion.ChatModel, path,
                                         device=sora.memory.get_manager().compute_device)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraPromptExpansion)
