"""Speed without new weights: a step cache and compiled transformer blocks, each a model in, the same model out.

Sora Step Cache skips the transformer on sampling steps where its input has barely changed and reuses the change
it made last (TeaCache, MagCache, EasyCache; `sora.step_cache`). Sora Compile Blocks runs the repeated
transformer block through torch.compile (`sora.compile`). Both only wrap the model handle: the loaded weights, and
every other branch of the graph, stay as they were. They chain, with each other and with LoRAs and memory options.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from ._common import about, category, mappings
from ._handles import DIT
from ._sora import sora

log = logging.getLogger(__name__)
CALIBRATE = "magcache calibrate"  # the method choice that measures MagCache's ratios instead of skipping


def _show_on_node(node_id) -> Callable[[str], None]:
    """A callback that puts a text on the node in the editor after it ran (ComfyUI's progress text); logs only
    headless or where the server has no such message."""
    def show(text: str) -> None:
        if node_id is None or not sora.runtime.in_comfyui():
            return
        try:
            from server import PromptServer  # ComfyUI's; present whenever the pack runs inside it
            send = PromptServer.instance.send_progress_text
        except (ImportError, AttributeError):  # an older ComfyUI: the log has the report
            return
        send(text, node_id)
    return show


class SoraStepCache:
    DISPLAY_NAME = "Sora Step Cache"
    DESCRIPTION = ("Skips the transformer on sampling steps where its input has barely changed, reusing the "
                   "change it made last: about 2-3x faster sampling with little visible loss. teacache and "
                   "easycache need nothing else; magcache needs the model's magnitude ratios (published for Wan "
                   "2.1 T2V / I2V / VACE-1.3B, or measured once with 'magcache calibrate'). The sampler reports "
                   "the forwards it skipped on this node and in the log when it ends.")
    CATEGORY = category("speed")
    FUNCTION = "apply"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The diffusion model to cache (connect one Step Cache to each Wan 2.2 "
                                           "A14B expert; each keeps its own state)."}),
                "method": ([*sora.step_cache.METHODS, CALIBRATE], {
                    "default": "easycache",
                    "tooltip": "easycache: no calibration, skips the whole forward (the fastest). teacache: the "
                               "timestep-modulated input's change (published coefficients for Wan 2.1). magcache: "
                               "the residual's magnitude ratios. 'magcache calibrate': skips nothing, measures this "
                               "model's ratios and stores them beside its file (<file>.magcache.json) for magcache."}),
                "threshold": ("FLOAT", {"default": sora.step_cache.DEFAULT_THRESHOLDS["easycache"], "min": 0.0,
                                        "max": 5.0, "step": 0.01,
                                        "tooltip": "How much accumulated change a skip may hide: higher skips more "
                                                   "(faster, less faithful); 0 skips nothing. Typical: easycache "
                                                   "0.05-0.2, teacache 0.1-0.3 (Wan 2.1 1.3B: 0.05-0.1), magcache "
                                                   "0.06-0.24."}),
                "start": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Fraction of the steps after which skipping may begin; the early "
                                               "steps lay out the video and always run (the first step always "
                                               "does)."}),
                "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Fraction of the steps after which nothing is skipped any more (the "
                                             "last step always runs)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def apply(self, model, method, threshold, start, end, unique_id=None):
        node, calibrate = type(self), method == CALIBRATE
        with about(node, "start"):  # what the widgets' ranges still allow to go wrong: start after end
            settings = sora.step_cache.CacheSettings("magcache" if calibrate else method, threshold, start, end,
                                                     calibrate=calibrate)
        with about(node, "method"):
            cache = sora.step_cache.step_cache(model, settings, report=_show_on_node(unique_id))
        text = f"{cache.describe()}; the sampler reports the skipped forwards here when it ends"
        log.info("%s: %s", self.DISPLAY_NAME, text)
        return {"ui": {"text": [text]}, "result": (model.wrapped(cache),)}


class SoraCompileBlocks:
    DISPLAY_NAME = "Sora Compile Blocks"
    DESCRIPTION = ("Compiles the repeated transformer block with torch.compile (one compiled block reused for every "
                   "layer, so the first run compiles for seconds, not minutes); later steps and runs are faster. "
                   "The token length is dynamic: a new video size does not compile again. Where compilation is "
                   "unavailable (no C++ compiler, no Triton) the model runs as before, with one warning.")
    CATEGORY = category("speed")
    FUNCTION = "apply"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The diffusion model whose blocks to compile."}),
                "mode": (list(sora.compile.MODES), {
                    "default": "default",
                    "tooltip": "torch.compile's mode: default; reduce-overhead (CUDA graphs, GPU only, more memory); "
                               "max-autotune-no-cudagraphs (tunes kernels: a much longer first run)."}),
                "dynamic": ("BOOLEAN", {"default": True,
                                        "tooltip": "Mark the video and prompt lengths dynamic, so that another size "
                                                   "reuses the compiled block. Off: one graph per size."}),
            },
        }

    def apply(self, model, mode, dynamic):
        settings = sora.compile.CompileSettings(mode, dynamic)
        device = sora.memory.get_manager().compute_device
        reason = sora.compile.unavailable(device)
        compiled = sora.compile.compile_blocks(model, settings, device)
        if reason is None:
            text = f"{model.name}: blocks compile on the first step ({mode}, {'dynamic' if dynamic else 'static'} " \
                   "shapes)"
        else:
            text = f"not compiled, the model runs as before: {reason}"
        return {"ui": {"text": [text]}, "result": (compiled,)}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraStepCache, SoraCompileBlocks)
