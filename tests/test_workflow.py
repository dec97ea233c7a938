"""The headless runner: loading both formats, validation errors, execution order and outputs."""
import json

import pytest
from test_workflow_nodes import CALLS, NODES, TinySampler, api_graph, sample_formula, ui_graph

from sora import runtime
from sora.errors import InputError
from sora.workflow import (
    NodeFailed,
    WorkflowError,
    apply_overrides,
    execute,
    load_workflow,
    run_workflow,
    ui_to_api,
    validate,
)


@pytest.fixture
def out(tmp_path, monkeypatch):
    """A fresh, not yet existing output folder for the headless host; restored afterwards."""
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(output_dir=tmp_path / "out", models_dir=tmp_path / "models")
    CALLS.clear()
    return tmp_path / "out"


def write(tmp_path, graph, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(graph))
    return path


def expected_frames(scale=2.0, seed=123, steps=6, text="a red ball"):
    """The frames API_GRAPH must produce: 2 channels x 3 latent frames (9 frames) x 3 cells (width 48)."""
    return sample_formula(2 * 3 * 3, scale, len(text) * scale, len("blurry") * scale, seed, steps, 2.5, "unipc")


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def test_api_graph_runs_needed_nodes_once_in_order(tmp_path, out):
    lines = []
    result = run_workflow(write(tmp_path, api_graph()), NODES, report=lines.append)
    # node 9 feeds no output node, so it never runs; the loader and the encoder feed several nodes but run once
    assert sorted(CALLS) == sorted(["TinyLoader", "TinyEncode", "TinyEncode", "TinyEmpty", "TinySampler",
                                    "TinyDecode", "TinySave"])
    assert CALLS.index("TinyLoader") < CALLS.index("TinyEncode") < CALLS.index("TinySampler") \
        < CALLS.index("TinyDecode") < CALLS.index("TinySave")
    assert len(lines) == 7 and lines[-1] == "[7/7] TinySave (#7)" and lines[0].startswith("[1/7] ")
    assert result.files == [out / "sora" / "clip_00001_.json"]
    assert result.outputs == {"7": {"images": [{"filename": "clip_00001_.json", "subfolder": "sora",
                                                 "type": "output"}], "animated": [True]}}
    saved = json.loads(result.files[0].read_text())
    assert saved["frames"] == pytest.approx(expected_frames())
    assert saved["loop"] is True and saved["meta"]["node"] == "7" and not saved["meta"]["has_ui_workflow"]


def test_second_run_continues_the_counter(tmp_path, out):
    path = write(tmp_path, api_graph())
    first = run_workflow(path, NODES).files
    second = run_workflow(path, NODES).files
    assert [f.name for f in first + second] == ["clip_00001_.json", "clip_00002_.json"]


def test_ui_format_converts_to_the_same_graph_and_result(tmp_path, out):
    converted = ui_to_api(ui_graph(), NODES)
    want = api_graph()
    want["4"]["inputs"]["denoise"] = 1.0  # missing from the saved widgets: the input's default, as in the editor
    assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in want.items()}
    assert converted["1"]["_meta"] == {"title": "Load"}

    api_file = run_workflow(write(tmp_path, api_graph(), "api.json"), NODES).files[0]
    ui_file = run_workflow(write(tmp_path, ui_graph(), "ui.json"), NODES).files[0]
    api_saved, ui_saved = json.loads(api_file.read_text()), json.loads(ui_file.read_text())
    assert ui_saved["frames"] == api_saved["frames"] and ui_saved["loop"] == api_saved["loop"]
    assert ui_saved["meta"]["has_ui_workflow"] and "TinyBoost" in ui_saved["meta"]["classes"]
    assert "TinyBoost" not in CALLS  # node 9 unused, node 10 bypassed


def test_post_body_wrapper_and_v1_link_objects(tmp_path, out):
    assert load_workflow({"prompt": api_graph(), "client_id": "x"}, NODES).prompt.keys() == api_graph().keys()
    ui = ui_graph()
    ui["links"] = [{"id": link[0], "origin_id": link[1], "origin_slot": link[2], "target_id": link[3],
                    "target_slot": link[4], "type": link[5]} for link in ui["links"]]
    ui["version"] = 1
    ui["links"].insert(3, None)  # a hole left by an older editor where a link was deleted
    assert ui_to_api(ui, NODES) == ui_to_api(ui_graph(), NODES)


def test_ui_control_after_generate_is_skipped_only_where_the_editor_adds_it(out):
    class Explicit(TinySampler):
        @classmethod
        def INPUT_TYPES(cls):
            spec = TinySampler.INPUT_TYPES()
            spec["required"]["seed"] = ("INT", {"min": 0, "control_after_generate": False})
            spec["required"]["steps"] = ("INT", {"min": 1, "max": 100, "control_after_generate": True})
            return spec
    ui = ui_graph()
    ui["nodes"][3]["type"] = "Explicit"
    ui["nodes"][3]["inputs"] = [s for s in ui["nodes"][3]["inputs"] if s["name"] != "steps"]
    ui["nodes"][3]["widgets_values"] = [123, 7, "increment", 2.5, "euler", 0.5]
    inputs = ui_to_api(ui, {**NODES, "Explicit": Explicit})["4"]["inputs"]
    assert (inputs["seed"], inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["denoise"]) == \
        (123, 7, 2.5, "euler", 0.5)


def test_overrides_are_applied_and_validated(tmp_path, out):
    path = write(tmp_path, api_graph())
    overrides = ["4.seed=7", "2.text=42", "7.filename_prefix=other/take", "1.name=a.safetensors"]
    result = run_workflow(path, NODES, overrides)
    saved = json.loads(result.files[0].read_text())
    assert saved["frames"] == pytest.approx(expected_frames(scale=1.0, seed=7, text="42"))
    assert result.files == [out / "other" / "take_00001_.json"]
    with pytest.raises(WorkflowError) as e:
        run_workflow(path, NODES, ["4.steps=0"])
    assert (e.value.node_id, e.value.class_type, e.value.input_name) == ("4", "TinySampler", "steps")
    with pytest.raises(WorkflowError, match="no node #44"):
        apply_overrides(api_graph(), ["44.seed=1"], NODES)
    with pytest.raises(WorkflowError, match="no such input; TinySampler has model, positive"):
        apply_overrides(api_graph(), ["4.sed=1"], NODES)
    with pytest.raises(WorkflowError, match="NODE_ID.INPUT=VALUE"):
        apply_overrides(api_graph(), ["4seed1"], NODES)


def test_user_error_in_a_node_names_the_node_and_keeps_the_cause(tmp_path, out):
    graph = api_graph()
    graph["5"]["inputs"]["frames"] = 8  # in range, but TinyEmpty itself refuses it
    with pytest.raises(WorkflowError) as e:
        execute(graph, NODES)
    assert (e.value.node_id, e.value.class_type) == ("5", "TinyEmpty")
    assert "node #5 (TinyEmpty): frames must be 1 + 4k" in str(e.value)
    assert isinstance(e.value.__cause__, InputError)
    assert not out.exists()


def test_bug_in_a_node_is_not_a_user_error(out):
    graph = api_graph()
    graph["6"]["inputs"]["latent"] = ["8", 0]
    graph["8"] = {"class_type": "TinyCrash", "inputs": {"latent": ["4", 0]}}
    with pytest.raises(NodeFailed, match=r"node #8 \(TinyCrash\) failed: ZeroDivisionError") as e:
        execute(graph, NODES)
    assert isinstance(e.value.__cause__, ZeroDivisionError) and not isinstance(e.value, WorkflowError)
    assert "TinySave" not in CALLS


def test_custom_validate_inputs_is_honoured(out):
    graph = api_graph()
    graph["8"] = {"class_type": "TinyGate", "inputs": {"latent": ["4", 0], "level": 9}}  # max 5 is its own job
    graph["6"]["inputs"]["latent"] = ["8", 0]
    assert validate(graph, NODES)[-3:] == ["8", "6", "7"]
    graph["8"]["inputs"]["level"] = 4
    with pytest.raises(WorkflowError, match="level must be odd, got 4") as e:
        validate(graph, NODES)
    assert (e.value.node_id, e.value.class_type, e.value.input_name) == ("8", "TinyGate", "level")
    graph["8"]["inputs"].update(level=3, latent=["2", 0])  # input_types in its signature: it checks link types
    with pytest.raises(WorkflowError, match="latent must be LATENT, got CONDITIONING"):
        validate(graph, NODES)


def test_list_mapping_nodes_are_refused_plainly(out):
    class ListDecode(NODES["TinyDecode"]):
        INPUT_IS_LIST = True
    graph = api_graph()
    graph["6"]["class_type"] = "ListDecode"
    with pytest.raises(WorkflowError, match="list mapping") as e:
        execute(graph, {**NODES, "ListDecode": ListDecode})
    assert (e.value.node_id, e.value.class_type) == ("6", "ListDecode") and CALLS == []


# ---------------------------------------------------------------------------------------------------------------
# Malformed graphs: one WorkflowError naming node, class and input; nothing written
# ---------------------------------------------------------------------------------------------------------------

def _set(node_id, name, value):
    def edit(g):
        g[node_id]["inputs"][name] = value
    return edit


def _drop(node_id, name):
    def edit(g):
        del g[node_id]["inputs"][name]
    return edit


def _add(node_id, node):
    def edit(g):
        g[node_id] = node
    return edit


def _cycle(g):
    g["8"] = {"class_type": "TinyBoost", "inputs": {"latent": ["9", 0], "amount": 1.0}}
    g["9"]["inputs"]["latent"] = ["8", 0]


def _no_output(g):
    del g["7"]


API_CASES = {
    "unknown class": (_add("8", {"class_type": "Nope", "inputs": {}}), ("8", "Nope", None), "unknown node class"),
    "core node": (_add("8", {"class_type": "KSampler", "inputs": {}}), ("8", "KSampler", None),
                  "ComfyUI core node; it only runs inside ComfyUI"),
    "editor-only node": (_add("8", {"class_type": "Note", "inputs": {}}), ("8", "Note", None),
                         "only in the ComfyUI editor"),
    "missing required": (_drop("4", "steps"), ("4", "TinySampler", "steps"), "required input is missing"),
    "missing required link": (_drop("4", "latent"), ("4", "TinySampler", "latent"), "link from a LATENT output"),
    "null required": (_set("4", "seed", None), ("4", "TinySampler", "seed"), "required input is missing"),
    "link to missing node": (_set("6", "latent", ["42", 0]), ("6", "TinyDecode", "latent"), "node #42, which is not"),
    "link to missing output": (_set("6", "latent", ["4", 1]), ("6", "TinyDecode", "latent"), "which has 1 output"),
    "malformed link": (_set("6", "latent", ["4", 0, 1]), ("6", "TinyDecode", "latent"), "[node_id, output_index]"),
    "negative output index": (_set("6", "latent", ["4", -1]), ("6", "TinyDecode", "latent"), "[node_id, output_index]"),
    "type mismatch": (_set("4", "latent", ["2", 0]), ("4", "TinySampler", "latent"),
                      "expects LATENT but is linked to output 0 (CONDITIONING) of node #2 (TinyEncode)"),
    "cycle": (_cycle, ("9", "TinyBoost", "latent"), "cycle: #8 (TinyBoost) needs #9 (TinyBoost) needs #8"),
    "self link": (_set("9", "latent", ["9", 0]), ("9", "TinyBoost", "latent"), "cycle"),
    "int as text": (_set("4", "steps", "ten"), ("4", "TinySampler", "steps"), "whole number"),
    "int as fraction": (_set("4", "steps", 2.5), ("4", "TinySampler", "steps"), "whole number"),
    "int as bool": (_set("4", "steps", True), ("4", "TinySampler", "steps"), "whole number"),
    "int below min": (_set("4", "steps", 0), ("4", "TinySampler", "steps"), "below the minimum 1"),
    "int above max": (_set("5", "width", 4096), ("5", "TinyEmpty", "width"), "above the maximum 256"),
    "float nan": (_set("4", "cfg", float("nan")), ("4", "TinySampler", "cfg"), "finite number"),
    "float above max": (_set("4", "cfg", 31), ("4", "TinySampler", "cfg"), "above the maximum 30.0"),
    "optional float below min": (_set("4", "denoise", -0.5), ("4", "TinySampler", "denoise"), "below the minimum"),
    "combo not a choice": (_set("4", "sampler_name", "ddim"), ("4", "TinySampler", "sampler_name"),
                           "'ddim' is not one of the choices: 'euler', 'unipc'"),
    "string as number": (_set("2", "text", 5), ("2", "TinyEncode", "text"), "expects text"),
    "boolean as text": (_set("7", "loop", "yes"), ("7", "TinySave", "loop"), "true or false"),
    "value for a socket": (_set("2", "model", "a.safetensors"), ("2", "TinyEncode", "model"),
                           "takes a MODEL from another node's output"),
    "no output node": (_no_output, (None, None, None), "no output node"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_malformed_api_graph(case, tmp_path, out):
    edit, where, message = API_CASES[case]
    graph = api_graph()
    edit(graph)
    with pytest.raises(WorkflowError) as e:
        run_workflow(write(tmp_path, graph), NODES)
    assert (e.value.node_id, e.value.class_type, e.value.input_name) == where
    assert message in str(e.value)
    node_id, class_type, input_name = where
    if node_id is not None:
        assert str(e.value).startswith(f"node #{node_id} ({class_type})")
    if input_name is not None:
        assert f"input '{input_name}'" in str(e.value)
    assert CALLS == [] and not out.exists()


def _ui_edit(node_index, **changes):
    def edit(ui):
        ui["nodes"][node_index].update(changes)
    return edit


def _ui_link_to_nowhere(ui):
    ui["nodes"][5]["inputs"][0]["link"] = 99


def _ui_bypass_without_match(ui):
    ui["nodes"][8]["inputs"][0]["type"] = "IMAGE"


def _ui_subgraph(ui):
    ui["definitions"] = {"subgraphs": [{"id": "a1b2"}]}
    ui["nodes"][7]["type"] = "a1b2"


def _ui_reroute_loop(ui):
    ui["links"].append([14, 20, 0, 20, 0, "*"])
    ui["nodes"][10]["inputs"][0]["link"] = 14


UI_CASES = {
    "unknown class": (_ui_edit(7, type="VHS_VideoCombine"), ("9", "VHS_VideoCombine", None), "unknown node class"),
    "widget value out of range": (_ui_edit(4, widgets_values=[48, 99]), ("5", "TinyEmpty", "frames"),
                                  "above the maximum 33"),
    "seed control value not skipped by a shifted list": (
        _ui_edit(3, widgets_values=[123, 6, 2.5, "unipc"]), ("4", "TinySampler", "steps"), "whole number"),
    "link id not in links": (_ui_link_to_nowhere, ("6", "TinyDecode", "latent"), "link 99, which is missing"),
    "bypassed node without a matching input": (_ui_bypass_without_match, ("6", "TinyDecode", "latent"),
                                               "bypassed node #10 (TinyBoost), which has no connected LATENT input"),
    "subgraph": (_ui_subgraph, ("9", "a1b2", None), "subgraphs and group nodes are not supported"),
    "reroute loop": (_ui_reroute_loop, ("4", "TinySampler", "model"), "form a loop"),
    "muted source leaves a required input empty": (_ui_edit(4, mode=2), ("4", "TinySampler", "latent"),
                                                   "required input is missing"),
}


@pytest.mark.parametrize("case", UI_CASES)
def test_malformed_ui_graph(case, tmp_path, out):
    edit, where, message = UI_CASES[case]
    ui = ui_graph()
    edit(ui)
    with pytest.raises(WorkflowError) as e:
        run_workflow(write(tmp_path, ui), NODES)
    assert (e.value.node_id, e.value.class_type, e.value.input_name) == where
    assert message in str(e.value)
    assert CALLS == [] and not out.exists()


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                                           ("{}", "must be a JSON object"), ('{"1": 5}', "class_type")])
def test_malformed_files(text, message, tmp_path, out):
    path = tmp_path / "wf.json"
    path.write_text(text)
    with pytest.raises(WorkflowError, match=message):
        run_workflow(path, NODES)
    with pytest.raises(WorkflowError, match="cannot read the workflow file"):
        run_workflow(tmp_path / "missing.json", NODES)
    with pytest.raises(WorkflowError, match="cannot read the workflow file"):  # not a path the OS can open
        run_workflow(str(tmp_path / "wf\x00.json"), NODES)
    assert not out.exists()
