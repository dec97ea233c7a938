"""Writes the shipped example workflows, each as twins that describe the same graph:

    workflows/<name>.json       the editor's format (litegraph v0.4): drag it into ComfyUI
    workflows/api/<name>.json   the API format: POST /prompt, `comfy run --workflow`, `sora run`

and the small input assets they load (workflows/assets/, made with the nano data generator). Both twins come
from one graph description below, so they cannot drift apart; widget values are written in each node's input
order, with the editor's extra control_after_generate value after every seed.

    python workflows/generate.py            # rewrite the JSON files (assets only when missing)
    python workflows/generate.py --assets   # also remake the assets
"""
from __future__ import annotations

import argparse
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
START_FRAME = "sora_start_frame.png"  # 320x176 (the 1280x704 aspect), resized by the workflow
SOURCE_CLIP = "sora_source_clip.mp4"  # 81 frames of 208x120 (the 832x480 aspect) at 16 fps
END_FRAME = "sora_end_frame.png"  # as START_FRAME, the ball further to the right

WAN21_DIT = "wan2.1_t2v_1.3B_bf16.safetensors"
WAN22_DIT = "wan2.2_ti2v_5B_fp16.safetensors"
I2V_HIGH, I2V_LOW = "wan2.2_i2v_high_noise_14B_fp16.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN21_VAE = "wan_2.1_vae.safetensors"
WAN22_VAE = "wan2.2_vae.safetensors"
NANO, MINILM, SMOLLM = "nano (embedded)", "minilm (embedded)", "smollm2-135m (embedded)"
LORA_NANO = "nano black (embedded)"
# Where the editor's missing-models dialog offers each file (ComfyUI's repackaged releases), and its folder.
_WAN21 = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
_WAN22 = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/"
WAN21_14B_DIT = "wan2.1_t2v_14B_bf16.safetensors"
DISTILL_LORA = "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"
I2V_HIGH_LORA = "wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors"
I2V_LOW_LORA = "wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors"
GGUF_DIT, GGUF_UMT5 = "wan2.1-t2v-14b-Q4_K_M.gguf", "umt5-xxl-encoder-Q8_0.gguf"
I2V_480P_DIT, FLF2V_DIT = "wan2.1_i2v_480p_14B_fp16.safetensors", "wan2.1_flf2v_720p_14B_fp16.safetensors"
CLIP_VISION_H = "clip_vision_h.safetensors"
VACE_DIT = "wan2.1_vace_1.3B_fp16.safetensors"
_LIGHTX2V_21 = "https://huggingface.co/lightx2v/Wan2.1-Distill-Loras/resolve/main/"
_LIGHTX2V_22 = "https://huggingface.co/lightx2v/Wan2.2-Distill-Loras/resolve/main/"
MODEL_FILES = {  # file -> (the address it is downloaded from, its folder)
    WAN21_DIT: (_WAN21 + "diffusion_models/", "diffusion_models"),
    WAN21_14B_DIT: (_WAN21 + "diffusion_models/", "diffusion_models"),
    WAN22_DIT: (_WAN22 + "diffusion_models/", "diffusion_models"),
    I2V_HIGH: (_WAN22 + "diffusion_models/", "diffusion_models"),
    I2V_LOW: (_WAN22 + "diffusion_models/", "diffusion_models"),
    UMT5: (_WAN21 + "text_encoders/", "text_encoders"), WAN21_VAE: (_WAN21 + "vae/", "vae"),
    WAN22_VAE: (_WAN22 + "vae/", "vae"),
    DISTILL_LORA: (_LIGHTX2V_21, "loras"), I2V_HIGH_LORA: (_LIGHTX2V_22, "loras"),
    I2V_LOW_LORA: (_LIGHTX2V_22, "loras"),
    GGUF_DIT: ("https://huggingface.co/city96/Wan2.1-T2V-14B-gguf/resolve/main/", "diffusion_models"),
    GGUF_UMT5: ("https://huggingface.co/city96/umt5-xxl-encoder-gguf/resolve/main/", "text_encoders"),
    I2V_480P_DIT: (_WAN21 + "diffusion_models/", "diffusion_models"),
    FLF2V_DIT: (_WAN21 + "diffusion_models/", "diffusion_models"),
    CLIP_VISION_H: (_WAN21 + "clip_vision/", "clip_vision"),
    VACE_DIT: (_WAN21 + "diffusion_models/", "diffusion_models"),
}

# How the editor (litegraph, ComfyUI's frontend) draws a node: a title bar of TITLE_HEIGHT above `pos`, then the
# body (`size`): one SLOT_HEIGHT row per input socket or output (side by side), then the widgets, each
# WIDGET_HEIGHT tall and a multiline text box at least MULTILINE_HEIGHT, and a little padding.
NODE_WIDTH, COLUMN_GAP, ROW_GAP = 340, 60, 30
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT, PADDING = 30, 20, 24, 110, 16


def body_height(sockets: int, outputs: int, widgets: list) -> int:
    """The height of a node's body (its `size[1]`) that shows every socket and widget without clipping.

    widgets: each widget's spec (a `sora.workflow.InputSpec`), multiline text boxes taller than the rest.
    """
    rows = max(sockets, outputs) * SLOT_HEIGHT
    return rows + sum(MULTILINE_HEIGHT if w.options.get("multiline") else WIDGET_HEIGHT for w in widgets) + PADDING


# ---------------------------------------------------------------------------------------------------------------
# A graph description and its two JSON forms
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Output:
    node: Node
    index: int


@dataclass
class Node:
    id: int
    class_type: str
    inputs: dict
    title: str | None = None
    bypassed: bool = False  # in the editor's format: there, off (mode 4); the API format passes its input through

    def __getitem__(self, index: int) -> Output:
        return Output(self, index)


@dataclass
class Graph:
    name: str
    description: str  # shown in a note in the editor
    nodes: list[Node] = field(default_factory=list)

    def add(self, class_type: str, title: str | None = None, bypassed: bool = False, **inputs) -> Node:
        node = Node(len(self.nodes) + 1, class_type, inputs, title, bypassed)
        self.nodes.append(node)
        return node


def _through(value: Output, specs: dict) -> Output:
    """Where a bypassed node's output comes from: its input of the output's type, as the editor passes it on."""
    while value.node.bypassed:
        wanted = specs[value.node.class_type][1][value.index]
        value = next(v for name, v in value.node.inputs.items() if isinstance(v, Output)
                     and specs[v.node.class_type][1][v.index] == wanted)
    return value


def _specs(classes: dict) -> dict:
    """class name -> (ordered inputs [(name, spec, is_widget, has_control)], return types, return names)."""
    from sora.workflow import node_spec
    specs = {}
    for name, cls in classes.items():
        spec = node_spec(cls)
        inputs = [(i.name, i, i.is_widget, i.has_control_value) for i in spec.inputs.values()]
        specs[name] = (inputs, spec.return_types, tuple(getattr(cls, "RETURN_NAMES", spec.return_types)))
    return specs


def _value(node: Node, name: str, spec) -> object:
    if name in node.inputs:
        return node.inputs[name]
    if "default" in spec.options:
        return spec.options["default"]
    return spec.choices[0] if spec.choices else None


def to_api(graph: Graph, specs: dict, display_names: dict) -> dict:
    prompt = {}
    for node in graph.nodes:
        unknown = set(node.inputs) - {name for name, *_ in specs[node.class_type][0]}
        if unknown:
            raise ValueError(f"{graph.name}: {node.class_type} has no input(s) {sorted(unknown)}")
        if node.bypassed:
            continue
        inputs = {}
        for name, spec, is_widget, _ in specs[node.class_type][0]:
            value = _value(node, name, spec) if is_widget or name in node.inputs else None
            if isinstance(value, Output):
                value = _through(value, specs)
                inputs[name] = [str(value.node.id), value.index]
            elif value is not None:
                inputs[name] = value
        title = node.title or display_names[node.class_type]
        prompt[str(node.id)] = {"class_type": node.class_type, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def _columns(graph: Graph) -> dict[int, int]:
    """Layout column of each node: one more than the furthest node it takes an input from."""
    column = {}
    for node in graph.nodes:  # nodes are added after their inputs
        sources = [v.node.id for v in node.inputs.values() if isinstance(v, Output)]
        column[node.id] = 1 + max((column[s] for s in sources), default=-1)
    return column


def to_ui(graph: Graph, specs: dict) -> dict:
    links, nodes_json = [], []
    outputs_links: dict[tuple[int, int], list[int]] = {}
    column = _columns(graph)
    next_y: dict[int, int] = {}
    note = {"id": len(graph.nodes) + 1, "type": "MarkdownNote", "pos": [40, 40 + TITLE_HEIGHT],
            "size": [NODE_WIDTH, 220],
            "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [graph.description], "title": "About this workflow"}
    for order, node in enumerate(graph.nodes, 1):
        inputs_spec, return_types, return_names = specs[node.class_type]
        slots, widgets, widget_specs = [], [], []
        for name, spec, is_widget, has_control in inputs_spec:
            value = node.inputs.get(name)
            link_id = None
            if isinstance(value, Output):
                link_id = len(links) + 1
                source_type = specs[value.node.class_type][1][value.index]
                links.append([link_id, value.node.id, value.index, node.id, len(slots), source_type])
                outputs_links.setdefault((value.node.id, value.index), []).append(link_id)
            if is_widget:
                widgets.append("" if isinstance(value, Output) else _value(node, name, spec))
                widget_specs.append(spec)
                if has_control:
                    widgets.append("fixed")  # the editor keeps seeds as saved: the example reproduces
            if not is_widget or link_id is not None:
                slot = {"name": name, "type": spec.type, "link": link_id}
                if is_widget:
                    slot["widget"] = {"name": name}
                slots.append(slot)
        x = 40 + column[node.id] * (NODE_WIDTH + COLUMN_GAP) + (NODE_WIDTH + COLUMN_GAP)
        y = next_y.get(column[node.id], 40 + TITLE_HEIGHT)
        height = body_height(len(slots), len(return_types), widget_specs)
        next_y[column[node.id]] = y + height + ROW_GAP + TITLE_HEIGHT  # the next node's title bar clears this one
        entry = {"id": node.id, "type": node.class_type, "pos": [x, y], "size": [NODE_WIDTH, height],
                 "flags": {}, "order": order, "mode": 4 if node.bypassed else 0, "inputs": slots,
                 "outputs": [{"name": return_names[i], "type": t, "links": [], "slot_index": i}
                             for i, t in enumerate(return_types)],
                 "properties": {"Node name for S&R": node.class_type}, "widgets_values": widgets}
        if node.title:
            entry["title"] = node.title
        nodes_json.append(entry)
    for entry in nodes_json:
        for output in entry["outputs"]:
            output["links"] = outputs_links.get((entry["id"], output["slot_index"]), [])
    files = [v for node in graph.nodes for v in node.inputs.values() if isinstance(v, str) and v in MODEL_FILES]
    models = [{"name": f, "url": MODEL_FILES[f][0] + f, "directory": MODEL_FILES[f][1]}
              for f in dict.fromkeys(files)]
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sora-video-dit/workflows/{graph.name}")), "revision": 0,
            "last_node_id": note["id"], "last_link_id": len(links), "nodes": nodes_json + [note], "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
            "models": models}


# ---------------------------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------------------------

def _loaders(g: Graph, dit: str, text_encoder: str, vae: str):
    model = g.add("SoraModelLoader", model_name=dit)
    encoder = g.add("SoraTextEncoderLoader", text_encoder_name=text_encoder)
    return model, encoder, g.add("SoraVAELoader", vae_name=vae)


def _finish(g: Graph, vae: Node, latent: Output, fps: float, prefix: str) -> None:
    frames = g.add("SoraVAEDecode", vae=vae[0], latent=latent)
    g.add("SoraSaveVideo", frames=frames[0], fps=fps, filename_prefix=prefix)


WAN_MODELS = ("Models (ComfyUI's models/ folders, or `sora run --models-dir DIR` with DIR/<folder>/):\n"
              "- diffusion_models/{dit}\n- text_encoders/" + UMT5 + "\n- vae/{vae}\n\n"
              "Smoke test without the real weights: `sora stand-ins DIR`.")


def wan21_t2v() -> Graph:
    g = Graph("wan21_t2v_1.3B", "# Text to video: Wan 2.1 T2V 1.3B\n\n832x480, 81 frames (5 s at 16 fps), the "
                                "reference settings (50 UniPC steps, shift 5, guidance 5).\n\n"
              + WAN_MODELS.format(dit=WAN21_DIT, vae=WAN21_VAE))
    model, encoder, vae = _loaders(g, WAN21_DIT, UMT5, WAN21_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A red fox trots through deep fresh snow in a quiet birch forest, lifting its paws high. Medium shot at "
        "eye level, the camera tracking sideways with it. Soft golden morning light, long blue shadows, fine "
        "snow in the air. Naturalistic wildlife documentary style."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    latent = g.add("SoraEmptyLatentVideo", model=model[0], width=832, height=480, frames=81)
    sampled = g.add("SoraSampler", model=model[0], positive=text[0], negative=text[1], latent=latent[0],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_t2v")
    return g


def wan22_ti2v_t2v() -> Graph:
    g = Graph("wan22_ti2v_5B_t2v", "# Text to video: Wan 2.2 TI2V 5B\n\n1280x704, 121 frames (5 s at 24 fps), "
                                   "the reference settings (50 UniPC steps, shift 5, guidance 5).\n\n"
              + WAN_MODELS.format(dit=WAN22_DIT, vae=WAN22_VAE))
    model, encoder, vae = _loaders(g, WAN22_DIT, UMT5, WAN22_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A small sailboat glides across a calm turquoise bay at sunset, its white sail glowing orange. Wide "
        "aerial shot slowly descending toward the water. Warm low sunlight, gentle ripples, distant green "
        "hills. Cinematic, rich colour, fine detail."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    latent = g.add("SoraEmptyLatentVideo", model=model[0], width=1280, height=704, frames=121)
    sampled = g.add("SoraSampler", model=model[0], positive=text[0], negative=text[1], latent=latent[0],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 24.0, "sora/wan22_ti2v_t2v")
    return g


def wan22_long_clip() -> Graph:
    g = Graph("wan22_ti2v_5B_long_clip",
              "# A long clip: generate, then extend forward twice\n\n"
              "Each extension continues from the last 16 frames of the part before it (kept as they are) and adds "
              "104 new frames; Sora Join Clips keeps every overlap once: 121 + 104 + 104 = 329 frames (13.7 s at "
              "24 fps). Wan 2.2 TI2V 5B keeps the known frames clean through its per-frame timesteps.\n\n"
              + WAN_MODELS.format(dit=WAN22_DIT, vae=WAN22_VAE))
    model, encoder, vae = _loaders(g, WAN22_DIT, UMT5, WAN22_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A vintage red tram travels along a seaside street lined with palm trees, passing cafes and cyclists. "
        "Steady side-tracking shot at street level. Bright midday sun, clear blue sky, sparkling sea. "
        "Realistic travel film, vivid colour."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    latent = g.add("SoraEmptyLatentVideo", model=model[0], width=1280, height=704, frames=121)
    sample = dict(model=model[0], positive=text[0], negative=text[1], sigmas=sigmas[0], guidance=5.0)
    first = g.add("SoraSampler", "Sampler: first clip", latent=latent[0], seed=42, **sample)
    cond_1 = g.add("SoraExtendForward", clip=first[0], overlap_frames=16, new_frames=104)
    second = g.add("SoraSampler", "Sampler: extension 1", latent=cond_1[0], seed=43, **sample)
    cond_2 = g.add("SoraExtendForward", clip=second[0], overlap_frames=16, new_frames=104)
    third = g.add("SoraSampler", "Sampler: extension 2", latent=cond_2[0], seed=44, **sample)
    joined = g.add("SoraJoinClips", part_1=first[0], part_2=second[0], part_3=third[0], overlap_frames=16)
    _finish(g, vae, joined[0], 24.0, "sora/wan22_long_clip")
    return g


def wan22_i2v() -> Graph:
    g = Graph("wan22_ti2v_5B_i2v",
              "# Image to video: Wan 2.2 TI2V 5B\n\nThe image (resized to 1280x704) becomes the first frame of a "
              f"121-frame clip at 24 fps. The example image, `{START_FRAME}`, ships in workflows/assets/; inside "
              "ComfyUI upload your own image to the input folder and type its name.\n\n"
              + WAN_MODELS.format(dit=WAN22_DIT, vae=WAN22_VAE))
    model, encoder, vae = _loaders(g, WAN22_DIT, UMT5, WAN22_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "The red ball rolls steadily to the right across the dark floor, casting a soft shadow. Static camera, "
        "even studio light, minimal clean style."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    image = g.add("SoraLoadImage", image=START_FRAME, width=1280, height=704)
    start = g.add("SoraVAEEncode", vae=vae[0], image=image[0])
    condition = g.add("SoraImageToVideo", start=start[0], frames=121)
    sampled = g.add("SoraSampler", model=model[0], positive=text[0], negative=text[1], latent=condition[0],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 24.0, "sora/wan22_i2v")
    return g


def wan22_i2v_a14b() -> Graph:
    g = Graph("wan22_i2v_A14B",
              "# Image to video: Wan 2.2 I2V A14B (two experts)\n\nThe image, resized and centre-cropped to 832x480, "
              "is the first frame of an 81-frame clip at 16 fps. The reference settings: 40 UniPC steps, shift 5; "
              "the high-noise expert runs while the noise level is at or above 0.9, then the low-noise expert; "
              f"guidance 3.5 for both. The example image, `{START_FRAME}`, ships in workflows/assets/; inside "
              "ComfyUI upload your own image to the input folder and type its name.\n\n"
              "Models (ComfyUI's models/ folders, or `sora run --models-dir DIR` with DIR/<folder>/):\n"
              f"- diffusion_models/{I2V_HIGH}\n- diffusion_models/{I2V_LOW}\n- text_encoders/{UMT5}\n"
              f"- vae/{WAN21_VAE}\n\nOptional 4-step distillation (the two LoRA nodes are bypassed; turn both on, then "
              "set 4 steps, schedule distill, guidance 1, sampler euler): "
              f"loras/{I2V_HIGH_LORA} and loras/{I2V_LOW_LORA}.\n\n"
              "Smoke test without the real weights: `sora stand-ins DIR`.")
    high, encoder, vae = _loaders(g, I2V_HIGH, UMT5, WAN21_VAE)
    low = g.add("SoraModelLoader", model_name=I2V_LOW)
    # Optional (bypassed; turn them on with Ctrl+B): the 4-step distillation LoRAs, one per expert. With them on,
    # use 4 steps, the distill schedule, guidance 1 and the euler sampler.
    high = g.add("SoraLoraLoader", "LoRA (high-noise expert)", bypassed=True, model=high[0], lora_name=I2V_HIGH_LORA)
    low = g.add("SoraLoraLoader", "LoRA (low-noise expert)", bypassed=True, model=low[0], lora_name=I2V_LOW_LORA)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "The red ball rolls steadily to the right across the dark floor, casting a soft shadow. Static camera, "
        "even studio light, minimal clean style."))
    sigmas = g.add("SoraScheduler", model=high[0], steps=40, shift=5.0)
    image = g.add("SoraLoadImage", image=START_FRAME)
    i2v = g.add("SoraWanImageToVideo", positive=text[0], negative=text[1], vae=vae[0], start_image=image[0],
                width=832, height=480, frames=81)
    sampled = g.add("SoraSampler", model=high[0], positive=i2v[0], negative=i2v[1], latent=i2v[2],
                    sigmas=sigmas[0], seed=42, guidance=3.5, model_low_noise=low[0], boundary=0.9,
                    guidance_low_noise=3.5)
    _finish(g, vae, sampled[0], 16.0, "sora/wan22_i2v_a14b")
    return g


def wan21_i2v_480p() -> Graph:
    g = Graph("wan21_i2v_14B_480p",
              "# Image to video: Wan 2.1 I2V 14B 480P\n\nThe image, resized and centre-cropped to 832x480, is the "
              "first frame of an 81-frame clip at 16 fps. Wan 2.1 I2V reads the image twice: encoded by the VAE "
              "into the model's extra input channels, and as 257 CLIP ViT-H/14 image tokens (Sora CLIP Vision "
              "Encode) in every block's cross-attention. The reference settings: 40 UniPC steps, shift 3 (5 for "
              f"the 720P model at 1280x720), guidance 5. The example image, `{START_FRAME}`, ships in "
              "workflows/assets/; inside ComfyUI upload your own image to the input folder and type its name.\n\n"
              "Models (ComfyUI's models/ folders, or `sora run --models-dir DIR` with DIR/<folder>/):\n"
              f"- diffusion_models/{I2V_480P_DIT}\n- clip_vision/{CLIP_VISION_H}\n- text_encoders/{UMT5}\n"
              f"- vae/{WAN21_VAE}\n\nSmoke test without the real weights: `sora stand-ins DIR`.")
    model, encoder, vae = _loaders(g, I2V_480P_DIT, UMT5, WAN21_VAE)
    clip_vision = g.add("SoraCLIPVisionLoader", clip_name=CLIP_VISION_H)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], negative_preset="wan i2v", prompt=(
        "The red ball rolls steadily to the right across the dark floor, casting a soft shadow. Static camera, "
        "even studio light, minimal clean style."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=40, shift=3.0)
    image = g.add("SoraLoadImage", image=START_FRAME)
    tokens = g.add("SoraCLIPVisionEncode", clip_vision=clip_vision[0], image=image[0], crop="none")
    i2v = g.add("SoraWanImageToVideo", positive=text[0], negative=text[1], vae=vae[0], start_image=image[0],
                width=832, height=480, frames=81, clip_vision_start_image=tokens[0])
    sampled = g.add("SoraSampler", model=model[0], positive=i2v[0], negative=i2v[1], latent=i2v[2],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_i2v_480p")
    return g


def wan21_flf2v() -> Graph:
    g = Graph("wan21_flf2v_14B",
              "# First and last frame to video: Wan 2.1 FLF2V 14B 720P\n\nThe clip starts on the first image and "
              "ends on the last (both resized and centre-cropped to 1280x720), 81 frames at 16 fps in between. "
              "Both images reach the model as VAE latents (first and last frame of the conditioning video) and as "
              "CLIP image tokens: the start image's 257, then the end image's. The reference settings: 50 UniPC "
              "steps, shift 16, guidance 5. The example images ship in workflows/assets/.\n\n"
              "Models (ComfyUI's models/ folders, or `sora run --models-dir DIR` with DIR/<folder>/):\n"
              f"- diffusion_models/{FLF2V_DIT}\n- clip_vision/{CLIP_VISION_H}\n- text_encoders/{UMT5}\n"
              f"- vae/{WAN21_VAE}\n\nSmoke test without the real weights: `sora stand-ins DIR`.")
    model, encoder, vae = _loaders(g, FLF2V_DIT, UMT5, WAN21_VAE)
    clip_vision = g.add("SoraCLIPVisionLoader", clip_name=CLIP_VISION_H)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], negative_preset="wan flf2v", prompt=(
        "The red ball rolls steadily to the right across the dark floor and comes to rest, casting a soft "
        "shadow. Static camera, even studio light, minimal clean style."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50, shift=16.0)
    first = g.add("SoraLoadImage", "Load Image: first frame", image=START_FRAME)
    last = g.add("SoraLoadImage", "Load Image: last frame", image=END_FRAME)
    first_tokens = g.add("SoraCLIPVisionEncode", clip_vision=clip_vision[0], image=first[0], crop="none")
    last_tokens = g.add("SoraCLIPVisionEncode", clip_vision=clip_vision[0], image=last[0], crop="none")
    flf = g.add("SoraWanImageToVideo", positive=text[0], negative=text[1], vae=vae[0], start_image=first[0],
                end_image=last[0], width=1280, height=720, frames=81, clip_vision_start_image=first_tokens[0],
                clip_vision_end_image=last_tokens[0])
    sampled = g.add("SoraSampler", model=model[0], positive=flf[0], negative=flf[1], latent=flf[2],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_flf2v")
    return g


VACE_MODELS = WAN_MODELS.format(dit=VACE_DIT, vae=WAN21_VAE)


def wan21_vace_control() -> Graph:
    g = Graph("wan21_vace_control_1.3B",
              "# Control video to video: Wan 2.1 VACE 1.3B\n\nThe source clip (resized to 832x480, its first 81 "
              "frames) is the control video: the new clip follows its layout and motion and takes its look from "
              "the prompt. A pose, depth or edge video (from a preprocessor node) works the same way; a mask "
              "(control_masks) limits where the model may change the video. The reference settings: 50 UniPC "
              f"steps, shift 16, guidance 5. The example video, `{SOURCE_CLIP}`, ships in workflows/assets/.\n\n"
              + VACE_MODELS)
    model, encoder, vae = _loaders(g, VACE_DIT, UMT5, WAN21_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A glowing orange paper lantern drifts across a night sky full of stars, painted in thick oil brush "
        "strokes. Static camera. Warm candle light against deep blue. Expressive impressionist painting."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    video = g.add("SoraLoadVideo", video=SOURCE_CLIP, max_frames=81, width=832, height=480)
    control = g.add("SoraVaceEncode", positive=text[0], negative=text[1], vae=vae[0], width=832, height=480,
                    frames=81, control_video=video[0])
    sampled = g.add("SoraSampler", model=model[0], positive=control[0], negative=control[1], latent=control[2],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_vace_control")
    return g


def wan21_vace_reference() -> Graph:
    g = Graph("wan21_vace_reference_1.3B",
              "# Reference image to video: Wan 2.1 VACE 1.3B\n\nThe subject of the reference image is kept in a "
              "new 832x480, 81-frame clip that the prompt describes. The reference becomes an extra latent frame "
              "in front of the video, which Sora Sampler drops from its output. The reference settings: 50 UniPC "
              f"steps, shift 16, guidance 5. The example image, `{START_FRAME}`, ships in workflows/assets/.\n\n"
              + VACE_MODELS)
    model, encoder, vae = _loaders(g, VACE_DIT, UMT5, WAN21_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "The red ball bounces across a sunny wooden table in a kitchen, casting a soft shadow. Handheld camera "
        "following it. Warm morning light. Realistic, fine detail."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    image = g.add("SoraLoadImage", image=START_FRAME)
    reference = g.add("SoraVaceEncode", positive=text[0], negative=text[1], vae=vae[0], width=832, height=480,
                      frames=81, reference_image=image[0])
    sampled = g.add("SoraSampler", model=model[0], positive=reference[0], negative=reference[1],
                    latent=reference[2], sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_vace_reference")
    return g


def wan21_vace_long_clip() -> Graph:
    g = Graph("wan21_vace_long_clip_1.3B",
              "# A long clip extended with VACE: Wan 2.1 VACE 1.3B\n\nAn 81-frame clip, then 64 new frames that "
              "continue from its last 16: Sora Extend Forward keeps them, Sora VACE Encode turns the kept frames "
              "into the VACE input (the model sees them as frames to keep, the rest to generate), and Sora Join "
              "Clips keeps the overlap once: 81 + 64 = 145 frames (9 s at 16 fps), 832x480.\n\n" + VACE_MODELS)
    model, encoder, vae = _loaders(g, VACE_DIT, UMT5, WAN21_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A red fox trots through deep fresh snow in a quiet birch forest, lifting its paws high. Medium shot at "
        "eye level, the camera tracking sideways with it. Soft golden morning light, long blue shadows, fine "
        "snow in the air. Naturalistic wildlife documentary style."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    latent = g.add("SoraEmptyLatentVideo", model=model[0], width=832, height=480, frames=81)
    sample = dict(model=model[0], sigmas=sigmas[0], guidance=5.0)
    first = g.add("SoraSampler", "Sampler: first clip", positive=text[0], negative=text[1], latent=latent[0],
                  seed=42, **sample)
    extend = g.add("SoraExtendForward", clip=first[0], overlap_frames=16, new_frames=64)
    condition = g.add("SoraVaceEncode", positive=text[0], negative=text[1], vae=vae[0], condition=extend[0])
    second = g.add("SoraSampler", "Sampler: extension", positive=condition[0], negative=condition[1],
                   latent=condition[2], seed=43, **sample)
    joined = g.add("SoraJoinClips", part_1=first[0], part_2=second[0], overlap_frames=16)
    _finish(g, vae, joined[0], 16.0, "sora/wan21_vace_long_clip")
    return g


def wan21_t2v_distill() -> Graph:
    g = Graph("wan21_t2v_14B_distill_lora",
              "# Text to video in 4 steps: Wan 2.1 T2V 14B with the lightx2v distillation LoRA\n\n832x480, 81 "
              "frames (5 s at 16 fps). The step- and guidance-distilled LoRA makes a clip in 4 model calls: the "
              "distill schedule (shift 5), guidance 1 (no negative pass), the lcm sampler; about ten times faster "
              "than 50 guided steps.\n\n"
              "Models (ComfyUI's models/ folders, or `sora run --models-dir DIR` with DIR/<folder>/):\n"
              f"- diffusion_models/{WAN21_14B_DIT}\n- loras/{DISTILL_LORA}\n- text_encoders/{UMT5}\n"
              f"- vae/{WAN21_VAE}\n\nSmoke test without the real weights: `sora stand-ins DIR`.")
    base, encoder, vae = _loaders(g, WAN21_14B_DIT, UMT5, WAN21_VAE)
    model = g.add("SoraLoraLoader", model=base[0], lora_name=DISTILL_LORA, strength=1.0)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A red fox trots through deep fresh snow in a quiet birch forest, lifting its paws high. Medium shot at "
        "eye level, the camera tracking sideways with it. Soft golden morning light, long blue shadows, fine "
        "snow in the air. Naturalistic wildlife documentary style."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=4, schedule="distill")
    latent = g.add("SoraEmptyLatentVideo", model=model[0], width=832, height=480, frames=81)
    sampled = g.add("SoraSampler", model=model[0], positive=text[0], negative=text[1], latent=latent[0],
                    sigmas=sigmas[0], seed=42, guidance=1.0, sampler_name="lcm")
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_t2v_14B_distill")
    return g


def wan21_t2v_gguf() -> Graph:
    g = Graph("wan21_t2v_14B_gguf",
              "# Text to video on a consumer card: Wan 2.1 T2V 14B from GGUF files\n\n832x480, 81 frames (5 s at 16 "
              "fps), the reference settings (50 UniPC steps, shift 5, guidance 5). city96's Q4_K_M DiT (about a "
              "third of the bf16 file) and Q8_0 umT5 stay quantised in memory and are dequantised layer by layer "
              "as they run; the memory manager streams what does not fit.\n\n"
              "Models (ComfyUI's models/ folders, or `sora run --models-dir DIR` with DIR/<folder>/):\n"
              f"- diffusion_models/{GGUF_DIT} (or unet/)\n- text_encoders/{GGUF_UMT5}\n- vae/{WAN21_VAE}\n\n"
              "Smoke test without the real weights: `sora stand-ins DIR`.")
    model, encoder, vae = _loaders(g, GGUF_DIT, GGUF_UMT5, WAN21_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A red fox trots through deep fresh snow in a quiet birch forest, lifting its paws high. Medium shot at "
        "eye level, the camera tracking sideways with it. Soft golden morning light, long blue shadows, fine "
        "snow in the air. Naturalistic wildlife documentary style."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    latent = g.add("SoraEmptyLatentVideo", model=model[0], width=832, height=480, frames=81)
    sampled = g.add("SoraSampler", model=model[0], positive=text[0], negative=text[1], latent=latent[0],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_t2v_14B_gguf")
    return g


def wan21_v2v() -> Graph:
    g = Graph("wan21_v2v_1.3B",
              "# Video to video: Wan 2.1 T2V 1.3B\n\nThe source video (resized to 832x480, its first 81 frames) is "
              "encoded, noised to strength 0.7 and sampled along the last 70% of the schedule: the layout and "
              f"motion stay, the look follows the prompt. The example video, `{SOURCE_CLIP}`, ships in "
              "workflows/assets/.\n\n" + WAN_MODELS.format(dit=WAN21_DIT, vae=WAN21_VAE))
    model, encoder, vae = _loaders(g, WAN21_DIT, UMT5, WAN21_VAE)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=(
        "A glowing orange paper lantern drifts across a night sky full of stars, painted in thick oil brush "
        "strokes. Static camera. Warm candle light against deep blue. Expressive impressionist painting."))
    sigmas = g.add("SoraScheduler", model=model[0], steps=50)
    video = g.add("SoraLoadVideo", video=SOURCE_CLIP, max_frames=81, width=832, height=480)
    encoded = g.add("SoraVAEEncode", vae=vae[0], image=video[0])
    condition = g.add("SoraVideoToVideo", video=encoded[0], sigmas=sigmas[0], strength=0.7)
    sampled = g.add("SoraSampler", model=model[0], positive=text[0], negative=text[1], latent=condition[0],
                    sigmas=condition[1], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/wan21_v2v")
    return g


NANO_NOTE = ("Runs on the embedded nano model: no model files, a CPU is enough. It knows a small world of "
             "coloured circles, squares and triangles moving on plain backgrounds.")


def _nano(g: Graph, prompt: object, step_cache: dict | None = None, lora: dict | None = None) -> None:
    model, encoder, vae = _loaders(g, NANO, MINILM, NANO)
    sampling_model = model if lora is None else g.add("SoraLoraLoader", model=model[0], **lora)
    if step_cache is not None:
        sampling_model = g.add("SoraStepCache", model=sampling_model[0], **step_cache)
    text = g.add("SoraTextEncode", text_encoder=encoder[0], prompt=prompt, negative_preset="none")
    sigmas = g.add("SoraScheduler", model=model[0], steps=20)
    latent = g.add("SoraEmptyLatentVideo", model=model[0], width=64, height=64, frames=33)
    sampled = g.add("SoraSampler", model=sampling_model[0], positive=text[0], negative=text[1], latent=latent[0],
                    sigmas=sigmas[0], seed=42, guidance=5.0)
    _finish(g, vae, sampled[0], 16.0, "sora/" + g.name)


def nano_t2v_step_cache() -> Graph:
    g = Graph("nano_t2v_step_cache",
              "# Text to video on nano with a step cache\n\nSora Step Cache (easycache) skips the transformer on "
              "steps where its input has barely changed and reuses the change it made last; when the sampler ends, "
              "the node shows how many of the forwards it skipped (also in the log). On nano about 1.7x faster at "
              "these 20 steps and 2.5x at 50, with the same colours and motion (benchmarks/speed.py). Put the "
              "cache between the loader and the sampler of any workflow (one per expert for Wan 2.2 A14B); "
              "threshold 0 turns it off.\n\n" + NANO_NOTE)
    _nano(g, "a red circle moving to the right on a dark background",
          step_cache=dict(method="easycache", threshold=0.1, start=0.2, end=1.0))
    return g


def nano_t2v_lora() -> Graph:
    g = Graph("nano_t2v_lora",
              "# Text to video on nano with a LoRA\n\nThe nano model never made a black object; the embedded LoRA "
              "\"nano black\" (trained by python -m sora.nano.train_lora, 10 CPU-minutes) teaches it the colour "
              "black. Set the LoRA's strength to 0 and the same prompt makes another colour. Any LoRA file in "
              "models/loras goes in the same place for Wan models.\n\n" + NANO_NOTE)
    _nano(g, "a black square moving up on a gray background", lora=dict(lora_name=LORA_NANO, strength=1.0))
    return g


def nano_t2v() -> Graph:
    g = Graph("nano_t2v", "# Text to video on the embedded nano model\n\n" + NANO_NOTE)
    _nano(g, "a red circle moving to the right on a dark background")
    return g


def nano_prompt_expansion() -> Graph:
    g = Graph("nano_prompt_expansion",
              "# Prompt expansion feeding text encode (nano)\n\nSora Prompt Expansion maps free text onto the nano "
              "model's vocabulary (preset nano); the caption is shown on the node and encoded. For Wan models use "
              "the wan preset, which writes a detailed paragraph with a local chat model.\n\n" + NANO_NOTE)
    expansion = g.add("SoraPromptExpansion", prompt="a crimson ball rolling right", preset="nano", model=SMOLLM,
                      seed=42)
    _nano(g, expansion[0])
    return g


WORKFLOWS = (wan21_t2v, wan21_t2v_distill, wan21_t2v_gguf, wan22_ti2v_t2v, wan22_long_clip, wan22_i2v,
             wan22_i2v_a14b, wan21_i2v_480p, wan21_flf2v, wan21_vace_control, wan21_vace_reference,
             wan21_vace_long_clip, wan21_v2v, nano_t2v, nano_t2v_step_cache, nano_t2v_lora, nano_prompt_expansion)


def build_all() -> dict[str, tuple[dict, dict]]:
    """name -> (UI-format workflow, API-format prompt), for every shipped workflow."""
    from sora.nodes import load_node_mappings
    classes, display_names, failures = load_node_mappings()
    if failures:
        raise RuntimeError(f"node modules failed to import: {failures}")
    specs = _specs(classes)
    return {g.name: (to_ui(g, specs), to_api(g, specs, display_names)) for g in (make() for make in WORKFLOWS)}


def write_assets(remake: bool = False) -> None:
    """The example inputs, rendered by the nano data generator: a red ball on a dark floor, the same ball further
    right (an end frame), and a moving clip. Only missing ones are written unless `remake`."""
    from sora import video_io
    from sora.nano.data import make_clip

    ASSETS.mkdir(exist_ok=True)
    ball = dict(height=176, width=320, color="red", shape="circle", background="dark", size="large")
    if remake or not (ASSETS / START_FRAME).exists():
        image = make_clip(7, frames=1, **ball).video
        video_io.write_png(ASSETS / START_FRAME, ((image[:, 0].permute(1, 2, 0) + 1) / 2)[None])
    if remake or not (ASSETS / END_FRAME).exists():
        image = make_clip(7, frames=33, direction="right", speed="fast", **ball).video
        video_io.write_png(ASSETS / END_FRAME, ((image[:, -1].permute(1, 2, 0) + 1) / 2)[None])
    if remake or not (ASSETS / SOURCE_CLIP).exists():
        clip = make_clip(11, frames=81, height=120, width=208, color="orange", shape="circle", background="dark",
                         direction="right", speed="slow").video
        video_io.write_mp4(ASSETS / SOURCE_CLIP, (clip.permute(1, 2, 3, 0) + 1) / 2, 16, crf=23)


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", action="store_true", help="remake the input assets too")
    args = parser.parse_args()
    write_assets(remake=args.assets)
    (HERE / "api").mkdir(exist_ok=True)
    for name, (ui, api) in build_all().items():
        (HERE / f"{name}.json").write_text(dumps(ui), encoding="utf-8")
        (HERE / "api" / f"{name}.json").write_text(dumps(api), encoding="utf-8")
        print(f"workflows/{name}.json, workflows/api/{name}.json")


if __name__ == "__main__":
    main()
