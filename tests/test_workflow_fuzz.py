"""Property-based fuzz of the graph loader and validator: whatever the JSON, the only error is WorkflowError."""
import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_workflow_nodes import NODES, api_graph, ui_graph

from sora.workflow import WorkflowError, apply_overrides, load_workflow, validate

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
# Values that look like parts of a graph are more likely to reach deep checks than arbitrary JSON.
near_values = json_values | st.sampled_from(["1", "4", "9", "42", 0, 1, -1, 2.5, "*"]) \
    | st.lists(st.sampled_from(["1", "2", "4", "5", "9", 0, 1, 2, -1]), min_size=1, max_size=3)
class_names = st.sampled_from(sorted(NODES) + ["KSampler", "Note", "Reroute", "PrimitiveNode", ""]) \
    | st.text(max_size=5)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_and_validate(data, overrides=()):
    """The property: success, or WorkflowError; anything else fails the test."""
    try:
        prompt = apply_overrides(load_workflow(data, NODES).prompt, overrides, NODES)
        order = validate(prompt, NODES)
    except WorkflowError as e:
        assert str(e)
        return None
    assert order and all(node_id in prompt for node_id in order)
    return order


@FUZZ
@given(json_values)
def test_random_json(data):
    load_and_validate(data)


@FUZZ
@given(st.data())
def test_mutated_api_graph(data):
    graph = api_graph()
    for _ in range(data.draw(st.integers(1, 4))):
        node_id = data.draw(st.sampled_from(sorted(graph) + ["new"]))
        node = graph.setdefault(node_id, {"class_type": "TinyBoost", "inputs": {}})
        action = data.draw(st.sampled_from(["input", "drop", "class", "node", "inputs"]))
        if action == "node":
            graph[node_id] = data.draw(json_values)
        elif not isinstance(node, dict):
            continue
        elif action == "class":
            node["class_type"] = data.draw(class_names | json_values)
        elif action == "inputs":
            node["inputs"] = data.draw(json_values)
        elif isinstance(node.get("inputs"), dict):
            names = sorted(node["inputs"]) + ["latent", "seed", "extra"]
            name = data.draw(st.sampled_from(names))
            if action == "drop":
                node["inputs"].pop(name, None)
            else:
                node["inputs"][name] = data.draw(near_values)
    load_and_validate(data.draw(st.sampled_from([graph, {"prompt": graph}])))


@FUZZ
@given(st.data())
def test_mutated_ui_graph(data):
    ui = ui_graph()
    for _ in range(data.draw(st.integers(1, 4))):
        target = data.draw(st.sampled_from(["node", "slot", "link", "top"]))
        if target == "top":
            ui[data.draw(st.sampled_from(["nodes", "links", "definitions", "version"]))] = data.draw(json_values)
        elif target == "link" and isinstance(ui.get("links"), list) and ui["links"]:
            link = ui["links"][data.draw(st.integers(0, len(ui["links"]) - 1))]
            if isinstance(link, list) and link:
                link[data.draw(st.integers(0, len(link) - 1))] = data.draw(near_values)
        elif isinstance(ui.get("nodes"), list) and ui["nodes"]:
            node = ui["nodes"][data.draw(st.integers(0, len(ui["nodes"]) - 1))]
            if not isinstance(node, dict):
                continue
            if target == "node":
                key = data.draw(st.sampled_from(["id", "type", "mode", "inputs", "widgets_values", "title"]))
                node[key] = data.draw(class_names if key == "type" else st.sampled_from([0, 2, 4]) | near_values)
            elif isinstance(node.get("inputs"), list) and node["inputs"] and isinstance(node["inputs"][0], dict):
                slot = node["inputs"][data.draw(st.integers(0, len(node["inputs"]) - 1))]
                if isinstance(slot, dict):
                    slot[data.draw(st.sampled_from(["name", "link", "type"]))] = data.draw(near_values)
            elif isinstance(node.get("widgets_values"), list) and node["widgets_values"]:
                values = node["widgets_values"]
                values[data.draw(st.integers(0, len(values) - 1))] = data.draw(near_values)
    load_and_validate(ui)


@FUZZ
@given(st.lists(st.text(alphabet=st.sampled_from(list("1245679.=seditlatn[]\"{}, 0-")), max_size=14), max_size=3))
def test_random_overrides(overrides):
    load_and_validate(api_graph(), overrides)


def test_unmutated_graphs_pass_and_mutations_do_not_leak_between_runs():
    graph, ui = api_graph(), ui_graph()
    before = (copy.deepcopy(graph), copy.deepcopy(ui))
    assert load_and_validate(graph) == load_and_validate(ui) == ["1", "2", "5", "3", "4", "6", "7"]
    assert (graph, ui) == before  # loading and validating never modify the caller's data
