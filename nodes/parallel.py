"""Several devices: a model in, the same model out with its calls computed by one process per device.

The sampler is unchanged and runs here (progress, previews and cancel as always); each of its model calls goes to
a group of worker processes, which split the clip's token sequence (Ulysses attention) and the guidance passes
between them (`sora.parallel`). The workers start on the first call, stay up between prompts and stop when the
model is unloaded or ComfyUI exits; each loads the weights itself from the model's file (`sora.parallel_launch`).
"""
from __future__ import annotations

from ._common import about, category, mappings
from ._handles import DIT
from ._sora import sora


class SoraParallel:
    DISPLAY_NAME = "Sora Parallel"
    DESCRIPTION = ("Runs the diffusion model on several devices, one worker process each: the video's tokens and "
                   "the guidance passes are split between them, the result is the same as on one device. The "
                   "workers start on the first sampling step and are kept between prompts.")
    CATEGORY = category("memory")
    FUNCTION = "apply"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The diffusion model to spread over the devices (a loaded file; LoRAs "
                                           "before or after this node apply)."}),
                "devices": ("STRING", {"default": "cuda:0,cuda:1",
                                       "tooltip": "One worker per entry, comma-separated: cuda:0,cuda:1,... (cpu,cpu "
                                                  "works for testing)."}),
                "mode": (list(sora.parallel.MODES), {
                    "default": "auto",
                    "tooltip": "auto: split the guidance passes where there are two or more and the tokens within "
                               "each; ulysses: split only the tokens; cfg: split only the guidance passes."}),
            },
            "optional": {
                "shard_weights": ("BOOLEAN", {"default": False,
                                              "tooltip": "Keep only a share of the weights on each device (FSDP2), "
                                                         "for a model that does not fit one; bf16 / fp16 weights, "
                                                         "no LoRA."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, devices):
        try:
            sora.parallel.parse_devices(devices)
        except sora.errors.InputError as e:
            return f"input 'devices': {e}"
        return True

    def apply(self, model, devices, mode, shard_weights=False):
        with about(type(self), "devices"):
            return (sora.parallel_launch.on_devices(model, devices, mode, shard_weights),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraParallel)
