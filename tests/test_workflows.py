"""The shipped workflows: generated twins match the committed files, UI and API formats describe the same graph,
the editor's format is well formed, every graph validates, the README lists what each needs, and each one runs
end to end with `sora run` (on the tiny stand-ins for Wan models; nano needs its shipped weights) and writes an
mp4 with the frames, size and rate the workflow asks for."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from sora import cli, runtime
from sora.nodes import load_node_mappings
from sora.workflow import SMOKE, api_prompt, apply_overrides, load_workflow, node_spec, validate

pytestmark = pytest.mark.usefixtures("fresh_manager")  # a memory manager of this module's own

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "workflows"
NAMES = sorted(p.stem for p in FOLDER.glob("*.json"))
CLASSES = load_node_mappings()[0]

SHRINK = SMOKE  # the stand-in runs are smoke runs (`sora run --smoke`); the files keep the reference sizes
# workflow -> (video frames, width, height, fps) of its mp4; nano workflows run as shipped
EXPECTED = {
    "wan21_t2v_1.3B": (9, 64, 32, 16), "wan22_ti2v_5B_t2v": (9, 64, 32, 24),
    "wan22_ti2v_5B_long_clip": (9 + 8 + 8, 64, 32, 24),  # clip, then two extensions of 8 new frames each
    "wan22_ti2v_5B_i2v": (9, 64, 32, 24), "wan21_v2v_1.3B": (9, 64, 32, 16), "wan22_i2v_A14B": (9, 64, 32, 16),
    "nano_t2v": (33, 64, 64, 16), "nano_prompt_expansion": (33, 64, 64, 16),
    "nano_t2v_step_cache": (33, 64, 64, 16), "nano_t2v_lora": (33, 64, 64, 16),
    "wan21_t2v_14B_distill_lora": (9, 64, 32, 16), "wan21_t2v_14B_gguf": (9, 64, 32, 16),
    "wan21_i2v_14B_480p": (9, 64, 32, 16), "wan21_flf2v_14B": (9, 64, 32, 16),
    "wan21_vace_control_1.3B": (9, 64, 32, 16), "wan21_vace_reference_1.3B": (9, 64, 32, 16),
    "wan21_vace_long_clip_1.3B": (9 + 8, 64, 32, 16),  # the clip, then an extension of 8 new frames
}
FILE_INPUTS = {"model_name": "diffusion_models", "text_encoder_name": "text_encoders", "vae_name": "vae",
               "lora_name": "loras", "clip_name": "clip_vision"}  # loader input -> the model folder it reads


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def graph(prompt: dict) -> dict:
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in prompt.items()}


@pytest.fixture(autouse=True)
def host(models, monkeypatch):
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models)


def test_every_workflow_has_both_twins():
    assert set(NAMES) == set(EXPECTED)
    assert sorted(p.stem for p in (FOLDER / "api").glob("*.json")) == NAMES


def test_committed_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("generate_workflows", FOLDER / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generate  # dataclasses look their module up while the file runs
    spec.loader.exec_module(generate)
    for name, (ui, api) in generate.build_all().items():
        assert (FOLDER / f"{name}.json").read_text(encoding="utf-8") == generate.dumps(ui), name
        assert (FOLDER / "api" / f"{name}.json").read_text(encoding="utf-8") == generate.dumps(api), name


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_describe_the_same_graph(name):
    converted = load_workflow(FOLDER / f"{name}.json", CLASSES).prompt
    api = api_prompt(read(FOLDER / "api" / f"{name}.json"))
    assert graph(converted) == graph(api)


@pytest.mark.parametrize("name", NAMES)
def test_ui_format_is_well_formed_litegraph(name):
    ui = read(FOLDER / f"{name}.json")
    assert ui["version"] == 0.4 and {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"} \
        <= set(ui)
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] == max(nodes)
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        output = nodes[origin]["outputs"][origin_slot]
        slot = nodes[target]["inputs"][target_slot]
        assert slot["link"] == link_id and link_id in output["links"]
        assert link_type == output["type"] == slot["type"]
    for node in ui["nodes"]:
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        if node["type"] not in CLASSES:
            assert node["type"] == "MarkdownNote"
            continue
        spec = node_spec(CLASSES[node["type"]])
        widgets = [i for i in spec.inputs.values() if i.is_widget]
        assert len(node["widgets_values"]) == len(widgets) + sum(i.has_control_value for i in widgets)
        for position, inp in enumerate(widgets):  # the control value sits right after the seed
            if inp.has_control_value:
                index = widgets.index(inp) + sum(w.has_control_value for w in widgets[:position])
                assert node["widgets_values"][index + 1] == "fixed"


@pytest.mark.parametrize("name", NAMES)
def test_workflows_validate_in_both_formats(name):
    validate(read(FOLDER / "api" / f"{name}.json"), CLASSES)
    validate(load_workflow(FOLDER / f"{name}.json", CLASSES).prompt, CLASSES)


@pytest.mark.parametrize("name", NAMES)
def test_the_editor_is_told_which_model_files_go_where(name):
    """The workflow's `models` list feeds the editor's missing-models dialog: every file a loader names, in the
    folder that loader reads, and nothing for the embedded models."""
    ui = read(FOLDER / f"{name}.json")
    nodes = list(load_workflow(FOLDER / f"{name}.json", CLASSES).prompt.values())
    nodes += [{"inputs": dict(zip(["model", "lora_name"], [None, n["widgets_values"][0]]))}
              for n in ui["nodes"] if n["type"] == "SoraLoraLoader" and n["mode"] == 4]  # bypassed LoRAs too
    needed = {(node["inputs"][key], folder) for node in nodes
              for key, folder in FILE_INPUTS.items() if "(embedded)" not in node["inputs"].get(key, "(embedded)")}
    listed = ui["models"]
    assert {(m["name"], m["directory"]) for m in listed} == needed and len(listed) == len(needed)
    for m in listed:
        if m["directory"] == "loras" or m["name"].endswith(".gguf"):  # lightx2v's and city96's releases
            assert m["url"].startswith(("https://huggingface.co/lightx2v/", "https://huggingface.co/city96/"))
            assert m["url"].endswith(f"/resolve/main/{m['name']}")
        else:
            assert m["url"].startswith("https://huggingface.co/Comfy-Org/") and m["url"].endswith(
                f"/split_files/{m['directory']}/{m['name']}")


def test_readme_lists_every_workflow_and_the_models_it_needs():
    readme = (FOLDER / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert f"\n### {name}.json\n" in readme, name
        section = readme.split(f"\n### {name}.json\n", 1)[1].split("\n### ", 1)[0]
        for m in read(FOLDER / f"{name}.json")["models"]:
            assert f"{m['directory']}/{m['name']}" in section, f"{name}: {m['name']}"


def overrides(name: str) -> list[str]:
    if name.startswith("nano"):
        return []
    api = read(FOLDER / "api" / f"{name}.json")
    return [f"--set={node_id}.{key}={value}" for node_id, node in api.items()
            for key, value in SHRINK.get(node["class_type"], {}).items()]


def probe(path: Path) -> tuple:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, stream.codec_context.width, stream.codec_context.height, stream.average_rate


@pytest.mark.parametrize("form", ["api", "ui"])
@pytest.mark.parametrize("name", NAMES)
def test_runs_end_to_end_with_sora_run(name, form, models, tmp_path, capsys):
    path = FOLDER / "api" / f"{name}.json" if form == "api" else FOLDER / f"{name}.json"
    out = tmp_path / "out"
    code = cli.main(["run", str(path), "--models-dir", str(models), "--output-dir", str(out), *overrides(name)])
    assert code == 0, capsys.readouterr().err
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(written) == 1 and written[0].parent.parent == out and written[0].suffix == ".mp4"
    assert probe(written[0]) == EXPECTED[name]
    with av.open(str(written[0])) as container:  # the graph travels in the file, as with core's Save Video
        stored = dict(container.metadata)
    settings = [o.removeprefix("--set=") for o in overrides(name)]
    ran = apply_overrides(read(FOLDER / "api" / f"{name}.json"), settings, CLASSES)
    assert graph(json.loads(stored["prompt"])) == graph(ran)
    assert (json.loads(stored["workflow"]) == read(path)) if form == "ui" else "workflow" not in stored


def test_the_console_script_runs_a_shipped_workflow(models, tmp_path):
    name = "wan21_t2v_1.3B"
    command = [sys.executable, "-m", "sora", "run", str(FOLDER / "api" / f"{name}.json"), "--models-dir",
               str(models), "--output-dir", str(tmp_path / "out"), *overrides(name)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    (written,) = done.stdout.split()
    assert probe(Path(written)) == EXPECTED[name]
    assert "[9/9] SoraSaveVideo" in done.stderr and "sampling" in done.stderr  # node and step progress


def test_missing_models_are_named_before_anything_runs(tmp_path, capsys):
    empty = tmp_path / "no_models"
    empty.mkdir()
    out = tmp_path / "out"
    code = cli.main(["run", str(FOLDER / "api" / "wan21_t2v_1.3B.json"), "--models-dir", str(empty),
                     "--output-dir", str(out)])
    error = capsys.readouterr().err
    assert code == 1
    assert "node #1 (SoraModelLoader), input 'model_name'" in error and "wan2.1_t2v_1.3B_bf16.safetensors" in error
    assert not out.exists()


def test_repeated_runs_reuse_the_loaded_models(models, tmp_path, monkeypatch, capsys):
    from sora import dit, text, vae
    loads = []
    for module, name in ((dit, "load_dit"), (text, "load_text_encoder"), (vae, "load_vae")):
        real = getattr(module, name)

        def counting(*args, real=real, name=name, **kwargs):
            loads.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    path = FOLDER / "api" / "wan21_t2v_1.3B.json"
    for _ in range(3):
        argv = ["run", str(path), "--models-dir", str(models), "--output-dir", str(tmp_path / "out")]
        assert cli.main(argv + overrides("wan21_t2v_1.3B")) == 0
    assert sorted(loads) == ["load_dit", "load_text_encoder", "load_vae"]  # once each, for three runs
    assert len(capsys.readouterr().out.split()) == 3  # three videos: _00001_, _00002_, _00003_


@pytest.mark.parametrize("name", NAMES)
def test_no_node_overlaps_another_as_the_editor_draws_them(name):
    """The editor draws a title bar (30 px) above each node's `pos` and the body below; the body must hold every
    socket row (20 px) and widget (about 24 px, a multiline text box at least 110 px) or the editor grows it over
    its neighbours."""
    ui = read(FOLDER / f"{name}.json")
    boxes = []
    for node in ui["nodes"]:
        x, y = node["pos"]
        width, height = node["size"]
        if node["type"] in CLASSES:
            spec = node_spec(CLASSES[node["type"]])
            widgets = [i for i in spec.inputs.values() if i.is_widget]
            needed = 20 * max(len(node["inputs"]), len(node["outputs"])) + 16 + \
                sum(110 if i.options.get("multiline") else 24 for i in widgets)
            assert height >= needed, (node["type"], height, needed)
        boxes.append((node["id"], x, y - 30, x + width, y + height))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{name}: nodes {a} and {b} overlap"
