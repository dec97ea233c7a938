"""Small V1 node classes and graphs shared by the workflow, CLI and fuzz tests (until the real nodes exist).

They form a miniature text-to-video pipeline (loader, encode, empty latent, sampler, decode, save) whose values
are short lists of floats, so a run is fast (no torch import, which matters for the CLI subprocess tests) and its
saved file shows exactly which values flowed through the graph. `CALLS` records every node function call.
"""
import copy
import json
import random

from sora import runtime
from sora.errors import InputError

CALLS: list[str] = []


def sample_formula(size, scale, positive, negative, seed, steps, cfg, sampler_name, denoise=1.0):
    """What TinySampler computes: seeded noise plus a guidance term, so every input changes the result."""
    noise = random.Random(seed)
    guide = positive if negative is None else positive + cfg * (positive - negative)
    return [noise.gauss(0, 1) * denoise + guide * steps * scale + (sampler_name == "unipc") for _ in range(size)]


class TinyLoader:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "load", ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (["a.safetensors", "b.safetensors"],)}}

    def load(self, name):
        CALLS.append("TinyLoader")
        return ({"scale": 2.0 if name == "b.safetensors" else 1.0},)


class TinyEncode:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "encode", ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "text": ("STRING", {"multiline": True})}}

    def encode(self, model, text):
        CALLS.append("TinyEncode")
        return (len(text) * model["scale"],)


class TinyEmpty:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "make", ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 32, "min": 16, "max": 256, "step": 16}),
                             "frames": ("INT", {"default": 5, "min": 1, "max": 33, "step": 4})}}

    def make(self, width, frames):
        CALLS.append("TinyEmpty")
        if (frames - 1) % 4:
            raise InputError(f"frames must be 1 + 4k, got {frames}")
        return ({"samples": [0.0] * (2 * ((frames - 1) // 4 + 1) * (width // 16))},)


class TinySampler:
    CATEGORY, FUNCTION, RETURN_TYPES, RETURN_NAMES = "test", "sample", ("LATENT",), ("latent",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "latent": ("LATENT",),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1}),
                             "steps": ("INT", {"default": 4, "min": 1, "max": 100}),
                             "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.5}),
                             "sampler_name": (["euler", "unipc"],)},
                "optional": {"negative": ("CONDITIONING",),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}}

    def sample(self, model, positive, latent, seed, steps, cfg, sampler_name, negative=None, denoise=1.0):
        CALLS.append("TinySampler")
        return ({"samples": sample_formula(len(latent["samples"]), model["scale"], positive, negative, seed, steps,
                                           cfg, sampler_name, denoise)},)


class TinyBoost:
    """LATENT -> LATENT, for bypass and cycle tests."""
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "boost", ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",), "amount": ("FLOAT", {"default": 1.0})}}

    def boost(self, latent, amount):
        CALLS.append("TinyBoost")
        return ({"samples": [v + amount for v in latent["samples"]]},)


class TinyDecode:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "decode", ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}}

    def decode(self, latent):
        CALLS.append("TinyDecode")
        return (list(latent["samples"]),)


class TinySave:
    """Writes the frames as JSON under the output folder, reporting the file like ComfyUI's SaveVideo."""
    CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "test", "save", (), True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "sora/clip"}),
                             "loop": ("BOOLEAN", {"default": False})},
                "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, images, filename_prefix, loop, prompt=None, unique_id=None, extra_pnginfo=None):
        CALLS.append("TinySave")
        target = runtime.save_path(filename_prefix, "json")
        meta = {"node": unique_id, "classes": sorted(n["class_type"] for n in prompt.values()),
                "has_ui_workflow": extra_pnginfo is not None}
        target.path.write_text(json.dumps({"frames": images, "loop": loop, "meta": meta}))
        return {"ui": {"images": [target.ui()], "animated": [True]}}


class TinyGate:
    """Checks its own inputs with VALIDATE_INPUTS, the ComfyUI convention (min/max are then its job)."""
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "gate", ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",), "level": ("INT", {"default": 3, "min": 0, "max": 5})}}

    @classmethod
    def VALIDATE_INPUTS(cls, level, input_types):
        if input_types.get("latent") not in ("LATENT", None):
            return f"latent must be LATENT, got {input_types['latent']}"
        return True if level % 2 else f"level must be odd, got {level}"

    def gate(self, latent, level):
        CALLS.append("TinyGate")
        return latent,


class TinyCrash:
    """A node with a bug."""
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "crash", ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}}

    def crash(self, latent):
        CALLS.append("TinyCrash")
        return ({"samples": latent["samples"], "oops": 1 // 0},)


NODES = {cls.__name__: cls for cls in (TinyLoader, TinyEncode, TinyEmpty, TinySampler, TinyBoost, TinyDecode,
                                       TinySave, TinyGate, TinyCrash)}

# The pipeline in API format. Node 4 uses the encoder twice (positive and negative), so the loader and encoder
# feed several nodes; node 9 is connected to nothing that is saved and must not run.
API_GRAPH = {
    "1": {"class_type": "TinyLoader", "inputs": {"name": "b.safetensors"}, "_meta": {"title": "Load"}},
    "2": {"class_type": "TinyEncode", "inputs": {"model": ["1", 0], "text": "a red ball"}},
    "3": {"class_type": "TinyEncode", "inputs": {"model": ["1", 0], "text": "blurry"}},
    "4": {"class_type": "TinySampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent": ["5", 0], "seed": 123, "steps": 6, "cfg": 2.5,
                                                   "sampler_name": "unipc"}},
    "5": {"class_type": "TinyEmpty", "inputs": {"width": 48, "frames": 9}},
    "6": {"class_type": "TinyDecode", "inputs": {"latent": ["4", 0]}},
    "7": {"class_type": "TinySave", "inputs": {"images": ["6", 0], "filename_prefix": "sora/clip", "loop": True}},
    "9": {"class_type": "TinyBoost", "inputs": {"latent": ["5", 0], "amount": 3.0}},
}


def _ui_node(node_id, type_, inputs=(), widgets=(), outputs=(), mode=0, **extra):
    return {"id": node_id, "type": type_, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
            "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
            "properties": {}, "widgets_values": list(widgets), **extra}


def ui_graph() -> dict:
    """The same pipeline as API_GRAPH in the editor's saved format (litegraph v0.4), with the editor's extras:
    the seed's control_after_generate value, a note, a reroute, a primitive driving `steps`, a muted save node, a
    bypassed boost between sampler and decode, the seed widget converted to a socket without a link, and
    `denoise` missing from widgets_values (a workflow saved before that input existed: the default applies)."""
    links = [
        [1, 1, 0, 2, 0, "MODEL"], [2, 1, 0, 3, 0, "MODEL"], [3, 1, 0, 20, 0, "*"], [4, 20, 0, 4, 0, "MODEL"],
        [5, 2, 0, 4, 1, "CONDITIONING"], [6, 3, 0, 4, 3, "CONDITIONING"], [7, 5, 0, 4, 2, "LATENT"],
        [8, 4, 0, 10, 0, "LATENT"], [9, 10, 0, 6, 0, "LATENT"], [10, 6, 0, 7, 0, "IMAGE"],
        [11, 21, 0, 4, 4, "INT"], [12, 6, 0, 11, 0, "IMAGE"], [13, 5, 0, 9, 0, "LATENT"],
    ]
    nodes = [
        _ui_node(1, "TinyLoader", widgets=["b.safetensors"], title="Load"),
        _ui_node(2, "TinyEncode", [{"name": "model", "type": "MODEL", "link": 1}], ["a red ball"]),
        _ui_node(3, "TinyEncode", [{"name": "model", "type": "MODEL", "link": 2}], ["blurry"]),
        _ui_node(4, "TinySampler", [
            {"name": "model", "type": "MODEL", "link": 4}, {"name": "positive", "type": "CONDITIONING", "link": 5},
            {"name": "latent", "type": "LATENT", "link": 7}, {"name": "negative", "type": "CONDITIONING", "link": 6},
            {"name": "steps", "type": "INT", "link": 11, "widget": {"name": "steps"}},
            {"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}},
        ], [123, "randomize", 6, 2.5, "unipc"]),
        _ui_node(5, "TinyEmpty", widgets=[48, 9]),
        _ui_node(6, "TinyDecode", [{"name": "latent", "type": "LATENT", "link": 9}]),
        _ui_node(7, "TinySave", [{"name": "images", "type": "IMAGE", "link": 10}], ["sora/clip", True]),
        _ui_node(9, "TinyBoost", [{"name": "latent", "type": "LATENT", "link": 13}], [3.0]),
        _ui_node(10, "TinyBoost", [{"name": "latent", "type": "LATENT", "link": 8}], [100.0], mode=4),
        _ui_node(11, "TinySave", [{"name": "images", "type": "IMAGE", "link": 12}], ["muted", False], mode=2),
        _ui_node(20, "Reroute", [{"name": "", "type": "*", "link": 3}], outputs=[{"name": "", "type": "MODEL"}]),
        _ui_node(21, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "widget": {"name": "steps"}}],
                 widgets=[6, "fixed"]),
        _ui_node(30, "Note", widgets=["Set the prompt in node 2."]),
    ]
    return {"id": "0d6c", "revision": 0, "last_node_id": 30, "last_link_id": 13, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def api_graph() -> dict:
    return copy.deepcopy(API_GRAPH)
