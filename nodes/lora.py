"""LoRAs: a model in, the same model with a LoRA's patches out.

The file comes from ComfyUI's `models/loras` folder (`--models-dir DIR/loras/` headless) or the `path` input, in
any layout the Wan LoRAs people have (original / ComfyUI, kohya / musubi, Wan-Fun, diffusers / PEFT, full deltas;
see `sora.lora`). Nodes chain: each adds its patches to a new handle, so several LoRAs stack, and the handle it
came from (and every other handle on the same loaded weights) computes exactly as before. For the Wan 2.2 A14B
pair, connect a high-noise LoRA to the high-noise expert and a low-noise LoRA to the low-noise one.
"""
from __future__ import annotations

import logging

from ._common import about, category, mappings
from ._handles import DIT
from ._sora import sora
from .loaders import PATH_TOOLTIP, _choices, _source, validate_file

log = logging.getLogger(__name__)
NANO_LORA = "nano black (embedded)"  # the shipped nano LoRA: teaches the nano model the colour black
UNMATCHED_SHOWN = 20  # unmatched keys listed on the node (all of them go to the log)


class SoraLoraLoader:
    DISPLAY_NAME = "Sora Load LoRA"
    DESCRIPTION = ("Applies a LoRA to the diffusion model (style and motion LoRAs, the 4-step distillation LoRAs), "
                   "at a strength; chain several. Reports how many of the file's keys applied and lists the others.")
    CATEGORY = category("loaders")
    FUNCTION = "load"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The diffusion model (or the expert of the Wan 2.2 A14B pair) the LoRA "
                                           "was made for."}),
                "lora_name": (_choices(NANO_LORA, "loras"), {
                    "tooltip": "A LoRA file in the loras folder, or the embedded nano LoRA (for the nano model: "
                               "it adds the colour black, as in 'a black circle moving up')."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How strongly the LoRA applies: 1 as trained, 0 not at all, "
                                                  "negative values push the other way."}),
            },
            "optional": {"path": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, path=""):
        return validate_file("loras", lora_name, path, embedded=NANO_LORA)

    def load(self, model, lora_name, strength, path=""):
        node = type(self)
        file = _source(node, "loras", "lora_name", lora_name, path, NANO_LORA, sora.nano.lora_path)
        with about(node, "path" if path.strip() else "lora_name"):
            lora = sora.model_cache.load(sora.lora.read_lora, file)
            applied = sora.lora.apply_lora(lora, model.model, strength, name=file.name)
        report = applied.summary(file.name)
        log.info("%s", report)
        lines = [report]
        if applied.unmatched:
            log.warning("%s: %d keys did not apply:\n  %s", file.name, len(applied.unmatched),
                        "\n  ".join(applied.unmatched))
            lines += [f"not applied ({len(applied.unmatched)}):", *applied.unmatched[:UNMATCHED_SHOWN]]
            if len(applied.unmatched) > UNMATCHED_SHOWN:
                lines.append(f"... and {len(applied.unmatched) - UNMATCHED_SHOWN} more (see the log)")
        return {"ui": {"text": ["\n".join(lines)]}, "result": (model.patched(*applied.patches),)}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraLoraLoader)
