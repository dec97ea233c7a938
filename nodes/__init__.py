"""ComfyUI nodes for every stage of the text-to-video pipeline, one module per stage.

The nodes are thin adapters: they declare inputs (with tooltips), check them, call one function of the `sora`
model package and return standard ComfyUI types. `load_node_mappings()` imports each module on its own, so a
failure in one (a missing optional dependency, say) is logged with its cause and the other nodes still load.
"""
import importlib
import logging

log = logging.getLogger(__name__)

# Each module exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.
NODE_MODULES: tuple[str, ...] = ("loaders", "lora", "clip_vision", "text_encode", "prompt_expansion", "sampling",
                                 "frame_conditioning", "vace", "vae_codec", "media", "memory_options", "parallel",
                                 "speed")

CATEGORY = "sora"  # root of our category tree in the node menu


def load_node_mappings() -> tuple[dict, dict, dict[str, BaseException]]:
    """(class mappings, display-name mappings, {module: error} for modules that failed to import)."""
    classes, names, failures = {}, {}, {}
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except Exception as e:  # one broken module must not stop ComfyUI from starting
            log.error("sora nodes: could not load %s.%s: %s: %s", __name__, name, type(e).__name__, e,
                      exc_info=e)
            failures[name] = e
            continue
        classes.update(module.NODE_CLASS_MAPPINGS)
        names.update(module.NODE_DISPLAY_NAME_MAPPINGS)
    return classes, names, failures
