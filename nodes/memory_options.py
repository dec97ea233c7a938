"""Memory options for a diffusion model: the expert overrides of the memory manager, which otherwise decides alone.

By default the manager keeps as many transformer blocks on the GPU as the free memory allows and streams the rest
from CPU memory; nothing needs tuning. This node pins those choices for one model when you want to: a memory
budget (to leave room for other programs) and how many blocks stay resident.
"""
from __future__ import annotations

from ._common import category, input_error, mappings
from ._handles import DIT

GiB = 2**30


class SoraMemoryOptions:
    DISPLAY_NAME = "Sora Memory Options"
    DESCRIPTION = ("Overrides the memory manager for one diffusion model: the GPU memory budget while it samples, "
                   "and how many transformer blocks stay on the GPU (the rest stream from CPU memory). The "
                   "defaults (automatic) need no tuning.")
    CATEGORY = category("memory")
    FUNCTION = "apply"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT, {"tooltip": "The diffusion model the options apply to."}),
            "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25,
                                    "tooltip": "GPU memory (GiB) the pack may use while this model samples, "
                                               "weights and activations together. 0 = automatic: the free memory "
                                               "minus a 1 GiB reserve."}),
            "blocks_resident": ("INT", {"default": -1, "min": -1, "max": 1000,
                                        "tooltip": "Transformer blocks kept on the GPU; the others stream from CPU "
                                                   "memory (slower, much less memory). -1 = automatic (as many as "
                                                   "fit), 0 = stream every block."}),
        }}

    def apply(self, model, budget_gb, blocks_resident):
        layers = model.config.num_layers
        if blocks_resident > layers:
            raise input_error(type(self), "blocks_resident", blocks_resident,
                              f"is more than the {layers} blocks of {model.name}; use 0..{layers} or -1 (automatic)")
        budget = round(budget_gb * GiB) if budget_gb > 0 else None
        resident = blocks_resident if blocks_resident >= 0 else None
        return (model.with_memory(blocks_resident=resident, budget_bytes=budget),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraMemoryOptions)
