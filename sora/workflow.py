"""Workflow graphs of this pack's nodes: load, convert, validate and run them without ComfyUI.

A workflow comes in one of ComfyUI's two JSON formats:

- API ("prompt") format: `{node_id: {"class_type", "inputs", "_meta"}}`, where an input is a literal value or a
  link `[source_node_id, output_index]` (also inside the POST /prompt body `{"prompt": {...}}`);
- UI ("save") format: litegraph's `nodes` / `links` / `widgets_values` (v0.4, and the v1 schema's link objects),
  converted here to the API format through each node class's input order, as the ComfyUI editor does.

Node classes are classic ComfyUI (V1) classes given as a NODE_CLASS_MAPPINGS-style dict: `INPUT_TYPES()` returns
`{"required", "optional", "hidden"}` of `name: (TYPE, options)`, where TYPE is a string or a list of choices
(a COMBO); `RETURN_TYPES`, `FUNCTION`, `OUTPUT_NODE`; the function returns a tuple or `{"ui", "result"}`.

The whole graph is validated before anything runs, with ComfyUI's rules; every problem is one `WorkflowError`
naming the node id, its class and the input. Then only the output nodes and what they depend on run, in dependency
order, each once.
"""
from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import runtime
from .errors import Interrupted, SoraError

NodeClasses = Mapping[str, type]
Prompt = dict[str, dict]  # API format: {node_id: {"class_type", "inputs", "_meta"}}

# Node ids that ComfyUI core registers (nodes.py and comfy_extras/); they only run inside ComfyUI.
CORE_NODES = frozenset({
    "KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "KSamplerSelect", "BasicScheduler",
    "BasicGuider", "CFGGuider", "DualCFGGuider", "RandomNoise", "DisableNoise", "SplitSigmas", "SplitSigmasDenoise",
    "CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader",
    "VAELoader", "LoraLoader", "LoraLoaderModelOnly", "CLIPVisionLoader", "CLIPVisionEncode", "CLIPTextEncode",
    "CLIPSetLastLayer", "ConditioningZeroOut", "ConditioningCombine", "ConditioningConcat",
    "ConditioningSetTimestepRange", "VAEDecode", "VAEEncode", "VAEDecodeTiled", "VAEEncodeTiled",
    "EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "LatentUpscale", "SetLatentNoiseMask",
    "LoadImage", "LoadImageMask", "SaveImage", "PreviewImage", "ImageScale", "ImageScaleBy", "ImageBatch",
    "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM", "SaveVideo", "CreateVideo", "GetVideoComponents",
    "LoadVideo", "ModelSamplingSD3", "ModelSamplingDiscrete", "ModelSamplingAuraFlow", "RescaleCFG",
    "WanImageToVideo", "WanFirstLastFrameToVideo", "WanFunControlToVideo", "WanFunInpaintToVideo",
    "WanVaceToVideo", "WanCameraImageToVideo", "Wan22ImageToVideoLatent", "TrimVideoLatent",
    "PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveStringMultiline", "PrimitiveBoolean",
})
# Editor-only nodes: never sent to the server. Notes are skipped, reroutes and primitives resolved.
NOTE_NODES = frozenset({"Note", "MarkdownNote"})
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
UI_ONLY_NODES = NOTE_NODES | {REROUTE, PRIMITIVE}

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")  # plus COMBO: the types the editor draws as widgets
SEED_NAMES = ("seed", "noise_seed")  # INT widgets that get the editor's control_after_generate value by default
MODE_MUTED, MODE_BYPASSED = 2, 4  # litegraph node modes ("never", "bypass")


class WorkflowError(SoraError):
    """A workflow that cannot run as given; names the node, its class and the input where known."""

    def __init__(self, message: str, *, node_id: str | None = None, class_type: str | None = None,
                 input_name: str | None = None):
        self.node_id, self.class_type, self.input_name = node_id, class_type, input_name
        where = ""
        if node_id is not None:
            where = f"node #{node_id}" + (f" ({class_type})" if class_type else "")
            where += (f", input '{input_name}'" if input_name is not None else "") + ": "
        super().__init__(where + message)


class NodeFailed(RuntimeError):
    """A node raised an unexpected exception (a bug, not a user error); the cause is kept as __cause__."""

    def __init__(self, node_id: str, class_type: str, cause: BaseException):
        self.node_id, self.class_type = node_id, class_type
        super().__init__(f"node #{node_id} ({class_type}) failed: {type(cause).__name__}: {cause}")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _id_order(node_id: str) -> tuple:
    """Sort key: numeric ids in numeric order, then the others ("12:5" subgraph ids) as text."""
    return (0, int(node_id), "") if node_id.isdecimal() else (1, 0, node_id)


# ---------------------------------------------------------------------------------------------------------------
# What a node class declares
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # socket or widget type; "COMBO" when `choices` is set
    options: dict
    required: bool
    choices: tuple | None = None

    @property
    def is_widget(self) -> bool:
        """Drawn as a widget in the editor (its value lives in `widgets_values`)."""
        return (self.choices is not None or self.type in WIDGET_TYPES) and not self.options.get("forceInput")

    @property
    def has_control_value(self) -> bool:
        """The editor stores one extra value ("fixed", "randomize", ...) after this widget."""
        flag = self.options.get("control_after_generate")
        return bool(flag) if flag is not None else (self.type == "INT" and self.name in SEED_NAMES)


@dataclass(frozen=True)
class NodeSpec:
    cls: type
    inputs: dict[str, InputSpec]  # required then optional, in INPUT_TYPES order
    hidden: dict[str, str]
    return_types: tuple[str, ...]  # a COMBO output appears as "COMBO"
    output_node: bool


def node_spec(cls: type) -> NodeSpec:
    """Read a V1 node class's declarations."""
    declared = cls.INPUT_TYPES()
    inputs = {}
    for group in ("required", "optional"):
        for name, entry in (declared.get(group) or {}).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
            if isinstance(kind, (list, tuple)):
                inputs[name] = InputSpec(name, "COMBO", options, group == "required", tuple(kind))
            elif kind == "COMBO" and "options" in options:
                inputs[name] = InputSpec(name, "COMBO", options, group == "required", tuple(options["options"]))
            else:
                inputs[name] = InputSpec(name, kind, options, group == "required")
    returns = tuple("COMBO" if isinstance(t, (list, tuple)) else t for t in cls.RETURN_TYPES)
    output_node = getattr(cls, "OUTPUT_NODE", False) is True
    return NodeSpec(cls, inputs, dict(declared.get("hidden") or {}), returns, output_node)


def _unknown_class(node_id: str, class_type: str, node_classes: NodeClasses) -> WorkflowError:
    ours = sorted(node_classes)
    listed = ", ".join(ours[:20]) + (", ..." if len(ours) > 20 else "") if ours else "none are loaded"
    if class_type in CORE_NODES:
        why = (f"'{class_type}' is a ComfyUI core node; it only runs inside ComfyUI, not in the headless runner. "
               f"Run this workflow in ComfyUI, or build it from this pack's nodes ({listed})")
    elif class_type in UI_ONLY_NODES:
        why = f"'{class_type}' exists only in the ComfyUI editor; an API-format workflow cannot contain it"
    else:
        why = (f"unknown node class '{class_type}': not one of this pack's nodes ({listed}). If it comes from "
               "another custom node pack, run the workflow inside ComfyUI")
    return WorkflowError(why, node_id=node_id, class_type=class_type)


# ---------------------------------------------------------------------------------------------------------------
# Loading: files, the API format, the UI format
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workflow:
    prompt: Prompt  # API format
    ui: dict | None = None  # the UI-format original, passed to nodes as extra_pnginfo["workflow"]


def load_workflow(source: str | Path | dict, node_classes: NodeClasses) -> Workflow:
    """Read a workflow file (or an already parsed JSON object) in either format."""
    data = source
    if isinstance(source, (str, Path)):
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a path with a NUL byte
            raise WorkflowError(f"cannot read the workflow file {source!r}: {getattr(e, 'strerror', None) or e}") \
                from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise WorkflowError(f"{source} is not valid JSON ({e}); export the workflow from ComfyUI with Save "
                                "(UI format) or Export (API)") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return Workflow(ui_to_api(data, node_classes), data)
    return Workflow(api_prompt(data))


def api_prompt(data) -> Prompt:
    """Check the structure of an API-format graph and return a normalised copy (string ids, links as [id, index])."""
    if isinstance(data, dict) and set(data) >= {"prompt"} and isinstance(data["prompt"], dict) \
            and "class_type" not in data["prompt"]:
        data = data["prompt"]  # the POST /prompt body
    if not isinstance(data, dict) or not data:
        raise WorkflowError("a workflow must be a JSON object of nodes: API format {node_id: {class_type, inputs}} "
                            "or the editor's saved format with \"nodes\" and \"links\"")
    prompt = {}
    for node_id, node in data.items():
        node_id = str(node_id)
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError("must be an object with a \"class_type\" string", node_id=node_id)
        class_type, inputs = node["class_type"], node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError("\"inputs\" must be an object of input names", node_id=node_id, class_type=class_type)
        inputs = {name: _normalise_input(value, node_id, class_type, name) for name, value in inputs.items()}
        meta = node.get("_meta") if isinstance(node.get("_meta"), dict) else {"title": class_type}
        prompt[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": meta}
    return prompt


def _normalise_input(value, node_id: str, class_type: str, name: str):
    """A link becomes [str id, int index]; any other list is malformed (list literals use {"__value__": [...]})."""
    if not isinstance(value, list):
        return value
    ok = (len(value) == 2 and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
          and isinstance(value[1], int) and not isinstance(value[1], bool) and value[1] >= 0)
    if not ok:
        raise WorkflowError(f"a link must be [node_id, output_index], got {_short(value)}",
                            node_id=node_id, class_type=class_type, input_name=name)
    return [str(value[0]), value[1]]


@dataclass(frozen=True)
class _UILink:
    origin: str
    slot: int
    type: str


def _ui_links(workflow: dict) -> dict[int, _UILink]:
    """link id -> origin, from v0.4 arrays [id, from, from_slot, to, to_slot, type] or v1 objects."""
    entries = workflow.get("links") or []
    if not isinstance(entries, list):
        raise WorkflowError("the workflow's \"links\" must be a list")
    links = {}
    for entry in entries:
        if entry is None:  # older editors leave holes where links were deleted
            continue
        if isinstance(entry, list) and len(entry) >= 6:
            link_id, origin, slot, link_type = entry[0], entry[1], entry[2], entry[5]
        elif isinstance(entry, dict):
            link_id, origin, slot = entry.get("id"), entry.get("origin_id"), entry.get("origin_slot")
            link_type = entry.get("type")
        else:
            raise WorkflowError(f"malformed link {_short(entry)} in the workflow's \"links\"")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (link_id, slot)) \
                or not isinstance(origin, (int, str)) or isinstance(origin, bool):
            raise WorkflowError(f"malformed link {_short(entry)} in the workflow's \"links\"")
        links[link_id] = _UILink(str(origin), slot, link_type if isinstance(link_type, str) else "*")
    return links


def _ui_nodes(workflow: dict) -> dict[str, dict]:
    nodes = {}
    for node in workflow["nodes"]:
        ok = isinstance(node, dict) and isinstance(node.get("type"), str) and isinstance(node.get("id"), (int, str))
        if not ok or isinstance(node.get("id"), bool):
            raise WorkflowError(f"malformed node {_short(node)}: each node needs an \"id\" and a \"type\"")
        node_id = str(node["id"])
        if node_id in nodes:
            raise WorkflowError("two nodes share this id", node_id=node_id, class_type=node["type"])
        if not isinstance(node.get("inputs", []), list) or not isinstance(node.get("mode", 0), int) \
                or not isinstance(node.get("widgets_values", []), (list, dict, type(None))):
            raise WorkflowError("malformed node: \"inputs\" must be a list, \"mode\" a number and "
                                "\"widgets_values\" a list", node_id=node_id, class_type=node["type"])
        for slot in node.get("inputs", []):
            link = slot.get("link") if isinstance(slot, dict) else None
            if not isinstance(slot, dict) or not isinstance(slot.get("name"), str) \
                    or not (link is None or (isinstance(link, int) and not isinstance(link, bool))):
                raise WorkflowError(f"malformed input slot {_short(slot)}", node_id=node_id, class_type=node["type"])
        nodes[node_id] = node
    return nodes


class _UIGraph:
    """Resolves where a link's value comes from, through reroutes, bypassed and muted nodes."""

    def __init__(self, workflow: dict):
        self.nodes = _ui_nodes(workflow)
        self.links = _ui_links(workflow)

    def source(self, link_id: int, node_id: str, class_type: str, name: str) -> list | str | None:
        """[origin id, slot] for a link; None if it comes from a muted node; PRIMITIVE for a primitive node."""
        seen = set()
        while True:
            if link_id in seen:
                raise WorkflowError("reroutes or bypassed nodes form a loop", node_id=node_id,
                                    class_type=class_type, input_name=name)
            seen.add(link_id)
            link = self.links.get(link_id)
            if link is None:
                raise WorkflowError(f"connected by link {link_id}, which is missing from the workflow's \"links\"",
                                    node_id=node_id, class_type=class_type, input_name=name)
            origin = self.nodes.get(link.origin)
            if origin is None:
                raise WorkflowError(f"link {link_id} comes from node #{link.origin}, which is not in the workflow",
                                    node_id=node_id, class_type=class_type, input_name=name)
            mode = origin.get("mode", 0)
            if origin["type"] == PRIMITIVE:
                return PRIMITIVE
            if mode == MODE_MUTED:
                return None
            if origin["type"] == REROUTE or mode == MODE_BYPASSED:
                link_id = self._pass_through(origin, link, node_id, class_type, name)
                continue
            return [link.origin, link.slot]

    def _pass_through(self, origin: dict, link: _UILink, node_id, class_type, name) -> int:
        """The link feeding `origin` that stands in for its output: a reroute's only input, or for a bypassed
        node the input of the output's type (the one at the same position first), as the editor does."""
        slots = [(i, s) for i, s in enumerate(origin.get("inputs", [])) if s.get("link") is not None]
        if origin["type"] != REROUTE:
            same_type = [(i, s) for i, s in slots if s.get("type") == link.type or "*" in (s.get("type"), link.type)]
            slots = [(i, s) for i, s in same_type if i == link.slot] or same_type
        if not slots:
            why = "the value comes through a reroute with nothing connected to it; connect it" \
                if origin["type"] == REROUTE else \
                (f"the value comes through bypassed node #{origin['id']} ({origin['type']}), which has no connected "
                 f"{link.type} input to pass on; connect one or un-bypass that node")
            raise WorkflowError(why, node_id=node_id, class_type=class_type, input_name=name)
        return slots[0][1]["link"]


def ui_to_api(workflow: dict, node_classes: NodeClasses) -> Prompt:
    """Convert the editor's saved format to the API format, as the ComfyUI editor does when it queues a prompt.

    Widget values map onto the widget inputs in INPUT_TYPES order, skipping the extra control_after_generate
    value after seed widgets; a widget converted to a socket takes its link when connected. Notes are dropped,
    reroutes followed, muted nodes dropped, bypassed nodes pass a matching input through.
    """
    graph = _UIGraph(workflow)
    definitions = workflow.get("definitions")
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    subgraph_ids = {s.get("id") for s in subgraphs if isinstance(s, dict)} if isinstance(subgraphs, list) else set()
    prompt = {}
    for node_id in sorted(graph.nodes, key=_id_order):
        node = graph.nodes[node_id]
        class_type, mode = node["type"], node.get("mode", 0)
        if class_type in UI_ONLY_NODES or mode in (MODE_MUTED, MODE_BYPASSED):
            continue
        if class_type in subgraph_ids or class_type.startswith("workflow>"):
            raise WorkflowError("subgraphs and group nodes are not supported by the headless runner; unpack it "
                                "in the editor (right-click > Unpack Subgraph) and save again",
                                node_id=node_id, class_type=class_type)
        if class_type not in node_classes:
            raise _unknown_class(node_id, class_type, node_classes)
        inputs = _ui_node_inputs(graph, node_id, node, node_spec(node_classes[class_type]))
        title = node.get("title") if isinstance(node.get("title"), str) else class_type
        prompt[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    if not prompt:
        raise WorkflowError("the workflow has no nodes to run (all are notes, muted or bypassed)")
    return prompt


def _ui_node_inputs(graph: _UIGraph, node_id: str, node: dict, spec: NodeSpec) -> dict:
    class_type = node["type"]
    links = {s["name"]: s["link"] for s in node.get("inputs", []) if s["link"] is not None}
    values = node.get("widgets_values") or []
    inputs, position = {}, 0
    for name, inp in spec.inputs.items():
        if inp.is_widget:
            if isinstance(values, dict):
                value = values.get(name)
            elif position < len(values):
                value = values[position]
            else:  # saved before this input existed: the editor fills in the default
                value = inp.options.get("default", inp.choices[0] if inp.choices else None)
            position += 1 + inp.has_control_value
            if value is not None:
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
        if name in links:
            source = graph.source(links[name], node_id, class_type, name)
            if source is None:  # from a muted node: unconnected, as in the editor
                inputs.pop(name, None)
            elif source != PRIMITIVE:  # a primitive's value is already the widget's value
                inputs[name] = source
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# Overrides (--set NODE_ID.INPUT=VALUE)
# ---------------------------------------------------------------------------------------------------------------

def apply_overrides(prompt: Prompt, overrides: Iterable[str], node_classes: NodeClasses) -> Prompt:
    """A copy of `prompt` with `NODE_ID.INPUT=VALUE` settings applied; VALUE is JSON when it parses as JSON,
    else text (text inputs always take the text as written). The result is validated like any workflow."""
    prompt = api_prompt(prompt)  # a checked copy
    for item in overrides:
        target, eq, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not (eq and dot and node_id and name):
            raise WorkflowError(f"--set expects NODE_ID.INPUT=VALUE, got {item!r}")
        if node_id not in prompt:
            ids = ", ".join(sorted(prompt, key=_id_order))
            raise WorkflowError(f"--set {item!r}: the workflow has no node #{node_id} (its nodes: {ids})")
        node = prompt[node_id]
        cls = node_classes.get(node["class_type"])
        if cls is None:
            raise _unknown_class(node_id, node["class_type"], node_classes)
        spec = node_spec(cls)
        if name not in spec.inputs:
            raise WorkflowError(f"--set {item!r}: no such input; {node['class_type']} has "
                                f"{', '.join(spec.inputs) or 'no inputs'}", node_id=node_id,
                                class_type=node["class_type"], input_name=name)
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            value = raw
        inp = spec.inputs[name]
        if inp.type == "STRING" and not isinstance(value, (str, list)):
            value = raw  # `--set 6.text=42` means the text "42"
        if inp.choices is not None and value not in inp.choices and raw in inp.choices:
            value = raw
        node["inputs"][name] = _normalise_input(value, node_id, node["class_type"], name)
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Link:
    node_id: str
    index: int


@dataclass
class _Plan:
    """A validated graph: each node's spec and inputs (checked literals or links), and what to run in order."""
    prompt: Prompt
    specs: dict[str, NodeSpec]
    values: dict[str, dict[str, object]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def _types_match(received: str, expected: InputSpec) -> bool:
    """ComfyUI's rule: "*" matches anything; otherwise comma-separated type lists must share a type."""
    if "*" in (received, expected.type):
        return True
    if expected.choices is not None:
        return received == "COMBO"
    if not isinstance(received, str) or not isinstance(expected.type, str):
        return received == expected.type
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.type.split(",")})


def _check_literal(inp: InputSpec, value, check_range: bool, where: dict):
    """The value a widget input runs with, or WorkflowError saying what is wrong with it."""
    def fail(message):
        return WorkflowError(message, **where)
    if isinstance(value, dict) and set(value) == {"__value__"}:
        value = value["__value__"]
    if inp.type == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not value.is_integer()):
            raise fail(f"expects a whole number (INT), got {_short(value)}")
        value = int(value)
    elif inp.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"expects a finite number (FLOAT), got {_short(value)}")
        value = float(value)
    elif inp.type == "STRING" and not isinstance(value, str):
        raise fail(f"expects text (STRING), got {_short(value)}; put it in quotes")
    elif inp.type == "BOOLEAN" and not isinstance(value, bool):
        raise fail(f"expects true or false (BOOLEAN), got {_short(value)}")
    elif inp.choices is None and inp.type not in WIDGET_TYPES:
        raise fail(f"takes a {inp.type} from another node's output; connect one (API format: "
                   f"[node_id, output_index]) instead of the value {_short(value)}")
    if not check_range:
        return value
    if inp.choices is not None and not any(type(value) is type(c) and value == c for c in inp.choices):
        shown = ", ".join(repr(c) for c in inp.choices[:20]) + (", ..." if len(inp.choices) > 20 else "")
        raise fail(f"{_short(value)} is not one of the choices: {shown}")
    if inp.type in ("INT", "FLOAT"):
        low, high = inp.options.get("min"), inp.options.get("max")
        allowed = f"from {low} to {high}" if low is not None and high is not None else \
            (f"at least {low}" if high is None else f"at most {high}")
        if low is not None and value < low:
            raise fail(f"{value} is below the minimum {low}; use a value {allowed}")
        if high is not None and value > high:
            raise fail(f"{value} is above the maximum {high}; use a value {allowed}")
    return value


def _custom_check_params(spec: NodeSpec) -> tuple[set[str], bool, bool]:
    """(input names VALIDATE_INPUTS takes, whether it takes **kwargs, whether it takes input_types)."""
    check = getattr(spec.cls, "VALIDATE_INPUTS", None)
    if check is None:
        return set(), False, False
    params = inspect.signature(check).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return set(params) & set(spec.inputs), takes_kwargs, "input_types" in params


def _check_node(plan: _Plan, node_id: str) -> None:
    node, spec = plan.prompt[node_id], plan.specs[node_id]
    class_type = node["class_type"]
    custom, custom_kwargs, custom_types = _custom_check_params(spec)
    values = {}
    for name, inp in spec.inputs.items():
        where = {"node_id": node_id, "class_type": class_type, "input_name": name}
        value = node["inputs"].get(name)
        if value is None:  # absent, or JSON null
            if inp.required:
                kind = f"a link from a {inp.type} output" if not inp.is_widget and inp.choices is None \
                    else "a value"
                raise WorkflowError(f"required input is missing; give it {kind}", **where)
            continue
        if isinstance(value, list):
            source_id, index = value
            source = plan.prompt.get(source_id)
            if source is None:
                raise WorkflowError(f"linked to node #{source_id}, which is not in the workflow", **where)
            returns = plan.specs[source_id].return_types
            if index >= len(returns):
                raise WorkflowError(f"linked to output {index} of node #{source_id} ({source['class_type']}), "
                                    f"which has {len(returns)} output(s)", **where)
            if not custom_types and not _types_match(returns[index], inp):
                raise WorkflowError(f"expects {inp.type} but is linked to output {index} ({returns[index]}) of node "
                                    f"#{source_id} ({source['class_type']}); connect a {inp.type} output", **where)
            values[name] = _Link(source_id, index)
        else:
            values[name] = _check_literal(inp, value, not (custom_kwargs or name in custom), where)
    plan.values[node_id] = values


def _run_custom_check(plan: _Plan, node_id: str) -> None:
    """A node class's own VALIDATE_INPUTS (ComfyUI convention): True passes, anything else is the reason."""
    spec = plan.specs[node_id]
    names, takes_kwargs, takes_types = _custom_check_params(spec)
    if not (names or takes_kwargs or takes_types):
        return
    values = plan.values[node_id]
    args = {n: (None if isinstance(v, _Link) else v) for n, v in values.items() if takes_kwargs or n in names}
    if takes_types:
        args["input_types"] = {n: plan.specs[v.node_id].return_types[v.index]
                               for n, v in values.items() if isinstance(v, _Link)}
    class_type = plan.prompt[node_id]["class_type"]
    input_name = next(iter(names)) if len(names) == 1 else None
    try:
        verdict = spec.cls.VALIDATE_INPUTS(**args)
    except SoraError as e:
        raise WorkflowError(str(e), node_id=node_id, class_type=class_type, input_name=input_name) from e
    except Exception as e:  # the node's check itself broke: still a refusal of this graph, with the cause kept
        raise WorkflowError(f"the node's input check failed with {type(e).__name__}: {e}", node_id=node_id,
                            class_type=class_type, input_name=input_name) from e
    if verdict is not True:
        reason = "rejected by the node's own input check" if verdict is False or verdict is None else str(verdict)
        named = re.match(r"input '([^']+)': (.*)", reason, re.DOTALL)  # a check of several inputs names the one
        if named and named[1] in spec.inputs:
            input_name, reason = named[1], named[2]
        raise WorkflowError(reason, node_id=node_id, class_type=class_type, input_name=input_name)


def _check_acyclic(plan: _Plan) -> None:
    """Depth-first search over links; a link back to a node on the current path closes a cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(plan.prompt, key=_id_order):
        if start in state:
            continue
        path = [(start, iter(_links_of(plan, start)))]
        state[start] = 1
        while path:
            node_id, pending = path[-1]
            step = next(pending, None)
            if step is None:
                state[node_id] = 2
                path.pop()
                continue
            name, source = step
            if state.get(source) == 1:
                ring = [n for n, _ in path][[n for n, _ in path].index(source):] + [source]
                shown = " needs ".join(f"#{n} ({plan.prompt[n]['class_type']})" for n in ring)
                raise WorkflowError(f"the links form a cycle: {shown}; a node cannot depend on its own output",
                                    node_id=node_id, class_type=plan.prompt[node_id]["class_type"], input_name=name)
            if source not in state:
                state[source] = 1
                path.append((source, iter(_links_of(plan, source))))


def _links_of(plan: _Plan, node_id: str) -> list[tuple[str, str]]:
    return [(name, v.node_id) for name, v in plan.values[node_id].items() if isinstance(v, _Link)]


def _execution_order(plan: _Plan) -> list[str]:
    """Output nodes and everything they depend on, each once, every node after its inputs."""
    outputs = [n for n in sorted(plan.prompt, key=_id_order) if plan.specs[n].output_node]
    if not outputs:
        raise WorkflowError("the workflow has no output node (such as a save node), so nothing would be produced; "
                            "add one")
    order, done = [], set()
    for output in outputs:
        stack = [(output, iter(_links_of(plan, output)))]
        while stack:
            node_id, pending = stack[-1]
            step = next(pending, None)
            if step is None:
                stack.pop()
                if node_id not in done:
                    done.add(node_id)
                    order.append(node_id)
            elif step[1] not in done:
                stack.append((step[1], iter(_links_of(plan, step[1]))))
    return order


def _plan(prompt: Prompt, node_classes: NodeClasses) -> _Plan:
    prompt = api_prompt(prompt)
    specs = {}
    for node_id, node in prompt.items():
        cls = node_classes.get(node["class_type"])
        if cls is None:
            raise _unknown_class(node_id, node["class_type"], node_classes)
        if getattr(cls, "INPUT_IS_LIST", False) or any(getattr(cls, "OUTPUT_IS_LIST", ())):
            raise WorkflowError("this node uses ComfyUI's list mapping (INPUT_IS_LIST / OUTPUT_IS_LIST), which the "
                                "headless runner does not support; run the workflow inside ComfyUI",
                                node_id=node_id, class_type=node["class_type"])
        specs[node_id] = node_spec(cls)
    plan = _Plan(prompt, specs)
    for node_id in sorted(prompt, key=_id_order):
        _check_node(plan, node_id)
    _check_acyclic(plan)
    for node_id in sorted(prompt, key=_id_order):
        _run_custom_check(plan, node_id)
    plan.order = _execution_order(plan)
    return plan


def validate(prompt: Prompt, node_classes: NodeClasses) -> list[str]:
    """Check the whole API-format graph; return the ids of the nodes that would run, in order.

    Raises WorkflowError for: an unknown class, a missing required input, a link to a missing node or output, a
    type mismatch between linked sockets, a cycle, a widget value of the wrong type, out of range or not among
    the choices, a node's own VALIDATE_INPUTS refusal, and a graph without output nodes.
    """
    return list(_plan(prompt, node_classes).order)


# ---------------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, dict]  # node id -> the node's "ui" result (ComfyUI's history "outputs")
    files: list[Path]  # files the output nodes reported, under the output folder


def _call_node(plan: _Plan, node_id: str, results: dict[str, tuple], extra_pnginfo: dict | None):
    spec = plan.specs[node_id]
    kwargs = {name: results[v.node_id][v.index] if isinstance(v, _Link) else v
              for name, v in plan.values[node_id].items()}
    hidden = {"PROMPT": plan.prompt, "UNIQUE_ID": node_id, "EXTRA_PNGINFO": extra_pnginfo}
    kwargs.update({name: hidden.get(kind) for name, kind in spec.hidden.items()})
    return getattr(spec.cls(), spec.cls.FUNCTION)(**kwargs)


def _split_result(returned, spec: NodeSpec, node_id: str, class_type: str) -> tuple[tuple, dict | None]:
    """(output values, ui dict) from a node's return value: a tuple, or {"ui": ..., "result": tuple}."""
    ui = None
    if isinstance(returned, dict):
        ui, returned = returned.get("ui"), returned.get("result", ())
    if returned is None and not spec.return_types:
        returned = ()
    if not isinstance(returned, (tuple, list)) or len(returned) < len(spec.return_types):
        cause = TypeError(f"returned {_short(returned)}; RETURN_TYPES declares {len(spec.return_types)} output(s)")
        raise NodeFailed(node_id, class_type, cause) from cause
    return tuple(returned), ui


def _files_in(ui: dict) -> list[Path]:
    """Files listed in a ui dict the ComfyUI way: [{"filename", "subfolder", "type": "output"}, ...]."""
    root = runtime.output_dir()
    return [root / entry.get("subfolder", "") / entry["filename"]
            for entries in ui.values() if isinstance(entries, list)
            for entry in entries
            if isinstance(entry, dict) and entry.get("type") == "output" and "filename" in entry]


def execute(prompt: Prompt, node_classes: NodeClasses, *, report: Callable[[str], None] | None = None,
            extra_pnginfo: dict | None = None) -> RunResult:
    """Validate the graph, then run its output nodes and what they need, each node once.

    `report` receives one line per node ("[3/7] SoraSampler (#5)"). Errors a user can fix (SoraError) come back
    as WorkflowError naming the node; other exceptions as NodeFailed; both keep the original as __cause__.
    Interrupted (Ctrl-C, ComfyUI's cancel) passes through unchanged.
    """
    plan = _plan(prompt, node_classes)
    consumers = dict.fromkeys(plan.order, 0)
    for node_id in plan.order:
        for _, source in _links_of(plan, node_id):
            consumers[source] += 1
    results: dict[str, tuple] = {}
    outputs, files = {}, []
    for step, node_id in enumerate(plan.order, 1):
        class_type = plan.prompt[node_id]["class_type"]
        runtime.check_interrupt()
        if report is not None:
            report(f"[{step}/{len(plan.order)}] {class_type} (#{node_id})")
        try:
            returned = _call_node(plan, node_id, results, extra_pnginfo)
        except Interrupted:
            raise
        except SoraError as e:
            raise WorkflowError(str(e), node_id=node_id, class_type=class_type) from e
        except Exception as e:
            raise NodeFailed(node_id, class_type, e) from e
        results[node_id], ui = _split_result(returned, plan.specs[node_id], node_id, class_type)
        if isinstance(ui, dict):
            outputs[node_id] = ui
            files += [f for f in _files_in(ui) if f not in files]
        for _, source in _links_of(plan, node_id):  # drop outputs no later node needs (models, latents)
            consumers[source] -= 1
            if consumers[source] == 0:
                del results[source]
    return RunResult(outputs, files)


# A smoke run (`sora run --smoke`): every size, length and step count of the graph shrunk, so that a Wan workflow on
# the stand-ins (`sora stand-ins`) runs in seconds on a CPU. class -> inputs set (sizes on every Wan grid).
SMOKE = {
    "SoraEmptyLatentVideo": {"width": 64, "height": 32, "frames": 9}, "SoraScheduler": {"steps": 2},
    "SoraLoadImage": {"width": 64, "height": 32}, "SoraLoadVideo": {"width": 64, "height": 32, "max_frames": 9},
    "SoraImageToVideo": {"frames": 9}, "SoraWanImageToVideo": {"width": 64, "height": 32, "frames": 9},
    "SoraVaceEncode": {"width": 64, "height": 32, "frames": 9},
    **{name: {"overlap_frames": 4, "new_frames": 8}
       for name in ("SoraExtendForward", "SoraExtendBackward", "SoraConnect", "SoraLoop")},
    "SoraJoinClips": {"overlap_frames": 4},
}


def smoke_overrides(prompt: Prompt) -> list[str]:
    """The `NODE_ID.INPUT=VALUE` settings of a smoke run of `prompt` (see `SMOKE`)."""
    return [f"{node_id}.{name}={json.dumps(value)}" for node_id in sorted(prompt, key=_id_order)
            for name, value in SMOKE.get(prompt[node_id]["class_type"], {}).items()]


def settable_inputs(prompt: Prompt, node_classes: NodeClasses) -> list[tuple[str, str, InputSpec, object]]:
    """(node id, class, spec, value) of every input `--set` can change: the widget values, not the links."""
    found = []
    for node_id in sorted(prompt, key=_id_order):
        node = prompt[node_id]
        cls = node_classes.get(node["class_type"])
        if cls is None:
            raise _unknown_class(node_id, node["class_type"], node_classes)
        for name, inp in node_spec(cls).inputs.items():
            value = node["inputs"].get(name)
            if inp.is_widget and not isinstance(value, list):
                found.append((node_id, node["class_type"], inp, value))
    return found


def run_workflow(source: str | Path | dict, node_classes: NodeClasses, overrides: Iterable[str] = (), *,
                 report: Callable[[str], None] | None = None, smoke: bool = False) -> RunResult:
    """Load a workflow file in either format, apply `--set` overrides (after the `smoke` settings, so they win),
    validate it and run it."""
    workflow = load_workflow(source, node_classes)
    overrides = [*(smoke_overrides(workflow.prompt) if smoke else ()), *overrides]
    prompt = apply_overrides(workflow.prompt, overrides, node_classes)
    extra = {"workflow": workflow.ui} if workflow.ui is not None else None
    return execute(prompt, node_classes, report=report, extra_pnginfo=extra)


def run(source: str | Path | dict, *, output_dir: str | Path = "output", models_dir: str | Path = "models",
        overrides: Iterable[str] = (), smoke: bool = False) -> list[Path]:
    """Run a workflow of this pack's nodes from Python, as `sora run` does, and return the files it wrote.

    Raises `WorkflowError` (a `sora.errors.SoraError`) naming the node and the input for anything a user can fix,
    `sora.errors.Interrupted` when stopped; nothing is written for a workflow that does not validate.
    """
    from . import runtime
    from .nodes import load_node_mappings

    classes, _, failures = load_node_mappings()
    if failures:
        module, error = next(iter(failures.items()))
        raise WorkflowError(f"node module {module} could not be loaded ({type(error).__name__}: {error})")
    runtime.configure(output_dir=output_dir, models_dir=models_dir)
    return run_workflow(source, classes, overrides, smoke=smoke).files
