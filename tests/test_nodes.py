"""The node classes as ComfyUI sees them: the pack imports as a custom node, every class declares a consistent
schema with tooltips, input errors name the node and the input, and the save node stays inside the output folder.
"""
import inspect
import json
import logging
import os
import sys

import av
import pytest
import torch

from sora import runtime, video_io
from sora.errors import InputError
from sora.workflow import node_spec

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")


@pytest.fixture
def pack(custom_node_package):
    return custom_node_package


@pytest.fixture
def output(tmp_path, monkeypatch):
    """A fresh headless output folder (the runtime's settings are restored afterwards)."""
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(output_dir=tmp_path / "output", models_dir=tmp_path / "models")
    return tmp_path / "output"


# ---------------------------------------------------------------------------------------------------------------
# Import as a custom node
# ---------------------------------------------------------------------------------------------------------------

def test_pack_imports_under_any_name_with_every_node(pack):
    classes, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    expected = {"SoraModelLoader", "SoraTextEncoderLoader", "SoraVAELoader", "SoraTextEncode", "SoraPromptExpansion",
                "SoraScheduler", "SoraEmptyLatentVideo", "SoraSampler", "SoraExtendForward", "SoraExtendBackward",
                "SoraConnect", "SoraLoop", "SoraImageToVideo", "SoraVideoToVideo", "SoraJoinClips", "SoraVAEDecode",
                "SoraVAEEncode", "SoraLoadImage", "SoraLoadVideo", "SoraSaveVideo", "SoraMemoryOptions"}
    assert expected <= set(classes)
    assert set(names) == set(classes)
    assert all(cls.__module__.startswith(pack.__name__ + ".nodes.") for cls in classes.values())
    assert (os.path.isdir(os.path.join(os.path.dirname(pack.__file__), pack.WEB_DIRECTORY)))
    assert "folder_paths" not in sys.modules and "comfy" not in sys.modules  # no ComfyUI import anywhere


def test_a_failing_node_module_is_logged_and_the_others_still_load(pack, monkeypatch, caplog):
    nodes_package = sys.modules[pack.__name__ + ".nodes"]
    real_import = nodes_package.importlib.import_module

    def import_module(name, *args):
        if name.endswith(".media"):
            raise ImportError("No module named 'av' (simulated)")
        return real_import(name, *args)

    monkeypatch.setattr(nodes_package.importlib, "import_module", import_module)
    with caplog.at_level(logging.ERROR):
        classes, names, failures = nodes_package.load_node_mappings()
    assert set(failures) == {"media"}
    assert "SoraSaveVideo" not in classes and "SoraSampler" in classes and "SoraLoadImage" not in names
    assert "media" in caplog.text and "simulated" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------

def all_classes():
    from sora.nodes import load_node_mappings
    classes, _, failures = load_node_mappings()
    assert not failures
    return sorted(classes.items())


@pytest.mark.parametrize("node_id, cls", all_classes())
def test_every_node_declares_a_consistent_schema(node_id, cls):
    from sora.nodes import load_node_mappings
    display_names = load_node_mappings()[1]
    assert node_id.startswith("Sora") and display_names[node_id].startswith("Sora ")
    assert cls.CATEGORY.startswith("sora/") and isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert getattr(cls, "OUTPUT_NODE", False) in (True, False)
    declared = cls.INPUT_TYPES()
    assert set(declared) <= {"required", "optional", "hidden"}
    spec = node_spec(cls)
    for name, inp in spec.inputs.items():
        assert inp.options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if "default" in inp.options and inp.choices is not None:
            assert inp.options["default"] in inp.choices
        if inp.type in ("INT", "FLOAT") and "default" in inp.options:
            assert inp.options.get("min", -1e300) <= inp.options["default"] <= inp.options.get("max", 1e300)
    function = getattr(cls, cls.FUNCTION)
    parameters = inspect.signature(function).parameters
    required = [n for n, i in spec.inputs.items() if i.required]
    optional = [n for n, i in spec.inputs.items() if not i.required] + list(spec.hidden)
    assert set(required) | set(optional) == set(parameters) - {"self"}
    assert all(parameters[n].default is inspect.Parameter.empty for n in required)
    assert all(parameters[n].default is not inspect.Parameter.empty for n in optional)


def test_seeds_get_the_editors_control_after_generate():
    seeds = [(node_id, name) for node_id, cls in all_classes() for name, inp in node_spec(cls).inputs.items()
             if name == "seed"]
    assert seeds and all(node_spec(dict(all_classes())[n]).inputs[s].has_control_value for n, s in seeds)


# ---------------------------------------------------------------------------------------------------------------
# Input errors name the node and the input
# ---------------------------------------------------------------------------------------------------------------

class FakeModel:
    """What SORA_DIT carries, without weights: enough for the empty latent node's checks."""
    def __init__(self, latent_format="wan21"):
        from sora.dit import PRESETS
        from sora.handle import ModelHandle
        config = PRESETS["wan22_ti2v_5b" if latent_format == "wan22" else "wan21_t2v_1_3b"]
        self.handle = ModelHandle(type("Dit", (), {"config": config})(), "fake.safetensors")


@pytest.mark.parametrize("inputs, message", [
    (dict(frames=30), "Sora Empty Latent Video: input 'frames' = 30 is not 1+4k (the VAE's causal frame grid); "
                      "use 29 or 33"),
    (dict(frames=0), "Sora Empty Latent Video: input 'frames' = 0 is not 1+4k"),
    (dict(width=840), "Sora Empty Latent Video: input 'width' = 840 is not a multiple of 16 (fake.safetensors: 8x "
                      "VAE compression, 2x2 patches); use 832 or 848"),
    (dict(height=8, fmt="wan22"), "Sora Empty Latent Video: input 'height' = 8 is not a multiple of 32"),
])
def test_empty_latent_errors(inputs, message):
    from sora.nodes.sampling import SoraEmptyLatentVideo
    fmt = inputs.pop("fmt", "wan21")
    values = dict(width=832, height=480, frames=81, batch=1) | inputs
    with pytest.raises(InputError) as info:
        SoraEmptyLatentVideo().generate(FakeModel(fmt).handle, **values)
    assert str(info.value).startswith(message)


def test_empty_latent_has_the_models_channels_and_compression():
    from sora.nodes.sampling import SoraEmptyLatentVideo
    (latent,) = SoraEmptyLatentVideo().generate(FakeModel("wan22").handle, width=1280, height=704, frames=121,
                                                batch=2)
    assert latent["samples"].shape == (2, 48, 31, 44, 80) and not latent["samples"].any()
    (latent,) = SoraEmptyLatentVideo().generate(FakeModel().handle, width=832, height=480, frames=81, batch=1)
    assert latent["samples"].shape == (1, 16, 21, 60, 104)


def clip_latent(frames=5):
    return {"samples": torch.randn(1, 16, frames, 4, 6)}


@pytest.mark.parametrize("node, call, message", [
    ("SoraExtendForward", lambda n: n.extend(clip_latent(), 16, 30),
     "Sora Extend Forward: input 'new_frames' = 30 is not a multiple of 4 (one latent frame holds 4 video frames); "
     "use 28 or 32"),
    ("SoraExtendBackward", lambda n: n.extend(clip_latent(), 6, 8), "Sora Extend Backward: input 'overlap_frames' = 6"),
    ("SoraExtendForward", lambda n: n.extend(clip_latent(2), 12, 8),
     "Sora Extend Forward: input 'overlap_frames' = 12 needs 3 latent frames but 'clip' has only 2 (5 video frames); "
     "use at most 8"),
    ("SoraExtendForward", lambda n: n.extend({"samples": torch.zeros(1, 4, 8, 8)}, 4, 8),
     "Sora Extend Forward: input 'clip' = LATENT [1, 4, 8, 8] is not a video latent"),
    ("SoraImageToVideo", lambda n: n.condition(clip_latent(1), 80), "Sora Image To Video: input 'frames' = 80 is not "
                                                                    "1+4k"),
    ("SoraImageToVideo", lambda n: n.condition(clip_latent(3), 9), "Sora Image To Video: input 'frames' = 9 leaves "
                                                                   "nothing to generate"),
    ("SoraJoinClips", lambda n: n.join(clip_latent(), clip_latent(), 4, False),
     "Sora Join Clips: input 'part_2': the last 1 latent frames of part 0 are not the first 1"),
    ("SoraVideoToVideo", lambda n: n.condition(clip_latent(), torch.tensor([0.5, 0.9, 0.0]), 0.5),
     "Sora Video To Video: input 'sigmas': sigmas must strictly decrease"),
])
def test_frame_conditioning_errors(node, call, message):
    from sora.nodes import frame_conditioning
    with pytest.raises(InputError) as info:
        call(getattr(frame_conditioning, node)())
    assert str(info.value).startswith(message)


def test_load_nodes_name_missing_files(tmp_path, monkeypatch):
    from sora.nodes.media import SoraLoadImage, SoraLoadVideo
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"^Sora Load Image: input 'image': image 'nope.png' was not found \(looked "):
        SoraLoadImage().load("nope.png", 0, 0)
    with pytest.raises(InputError, match=r"^Sora Load Video: input 'video': no video given"):
        SoraLoadVideo().load(" ", 81, 0, 0, 0)
    (tmp_path / "broken.mp4").write_text("not a video")
    with pytest.raises(Exception, match=r"^Sora Load Video: input 'video': cannot read .*broken.mp4"):
        SoraLoadVideo().load("broken.mp4", 81, 0, 0, 0)


def test_load_nodes_find_relative_files_in_the_current_directory_then_the_shipped_assets(tmp_path, monkeypatch):
    from sora.nodes.media import SoraLoadImage, SoraLoadVideo
    monkeypatch.chdir(tmp_path)
    (image,) = SoraLoadImage().load("sora_start_frame.png", 0, 0)  # from workflows/assets
    assert image.shape == (1, 176, 320, 3)
    mine = torch.rand(1, 20, 30, 3)
    video_io.write_png(tmp_path / "sora_start_frame.png", mine)
    (image,) = SoraLoadImage().load("sora_start_frame.png", 0, 0)  # the current directory comes first
    assert image.shape == (1, 20, 30, 3)
    (image,) = SoraLoadImage().load(str(tmp_path / "sora_start_frame.png"), 60, 0)  # one side: keep the aspect
    assert image.shape == (1, 40, 60, 3)
    frames, fps = SoraLoadVideo().load("sora_source_clip.mp4", 9, 2, 64, 32)
    assert frames.shape == (9, 32, 64, 3) and fps == 16.0


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------

def moving_frames(count=9, height=32, width=48):
    frames = torch.zeros(count, height, width, 3)
    for f in range(count):
        frames[f, 8:16, 2 + 3 * f:10 + 3 * f] = 1.0
    return frames


def test_save_reports_its_file_like_core_save_video_and_counts_up(output):
    from sora.nodes.media import SoraSaveVideo
    first = SoraSaveVideo().save(moving_frames(), 16.0, 19, "clips/fox")
    second = SoraSaveVideo().save(moving_frames(), 16.0, 19, "clips/fox")
    assert first == {"ui": {"images": [{"filename": "fox_00001_.mp4", "subfolder": "clips", "type": "output"}],
                            "animated": [True]}, "result": ()}
    assert second["ui"]["images"][0]["filename"] == "fox_00002_.mp4"
    with av.open(str(output / "clips" / "fox_00001_.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 16
        assert sum(1 for _ in container.decode(stream)) == 9


def test_save_stores_the_graph_in_the_file_like_core(output):
    from sora.nodes.media import SoraSaveVideo
    prompt = {"1": {"class_type": "SoraSaveVideo", "inputs": {"fps": 16.0}}}
    workflow = {"nodes": [{"id": 1, "type": "SoraSaveVideo"}], "links": [], "version": 0.4}
    SoraSaveVideo().save(moving_frames(), 16.0, 19, "clip", prompt=prompt, extra_pnginfo={"workflow": workflow})
    with av.open(str(output / "clip_00001_.mp4")) as container:
        stored = dict(container.metadata)
    assert json.loads(stored["prompt"]) == prompt and json.loads(stored["workflow"]) == workflow


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/escape", "clips/../../escape", "C:/escape", "a/../../b"])
def test_save_refuses_to_write_outside_the_output_folder(output, tmp_path, prefix):
    from sora.nodes.media import SoraSaveVideo
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match=r"^Sora Save Video: input 'filename_prefix': "):
        SoraSaveVideo().save(moving_frames(), 16.0, 19, prefix)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == [p for p in before if p.is_file()]
    assert not list((tmp_path.parent).glob("escape*")) and not os.path.exists("/tmp/escape_00001_.mp4")


def test_save_through_a_symlink_out_of_the_output_folder_is_refused(output, tmp_path):
    from sora.nodes.media import SoraSaveVideo
    outside = tmp_path / "outside"
    outside.mkdir()
    output.mkdir()
    (output / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match="outside the output folder"):
        SoraSaveVideo().save(moving_frames(), 16.0, 19, "link/clip")
    assert list(outside.iterdir()) == []


def test_failed_encoding_leaves_no_partial_file(output, monkeypatch):
    from sora.nodes.media import SoraSaveVideo
    real = av.VideoFrame.from_ndarray
    count = []

    def fail_on_the_fifth_frame(*args, **kwargs):
        count.append(1)
        if len(count) == 5:
            raise MemoryError("out of memory while encoding")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_on_the_fifth_frame)
    with pytest.raises(MemoryError):
        SoraSaveVideo().save(moving_frames(), 16.0, 19, "clips/fox")
    assert [p for p in output.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", real)
    result = SoraSaveVideo().save(moving_frames(), 16.0, 19, "clips/fox")
    assert result["ui"]["images"][0]["filename"] == "fox_00001_.mp4"  # the failed attempt used no counter


def test_save_names_bad_frames(output):
    from sora.nodes.media import SoraSaveVideo
    with pytest.raises(InputError, match=r"^Sora Save Video: input 'frames': H.264 video needs an even width"):
        SoraSaveVideo().save(torch.rand(3, 31, 48, 3), 16.0, 19, "clip")
    assert not output.exists() or [p for p in output.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------------------------------------------
# The web extension
# ---------------------------------------------------------------------------------------------------------------

EXTENSION_DRIVER = """
globalThis.document = {createElement: (tag) => ({tag, value: "", style: {}, readOnly: false})};
const {registered} = await import("./scripts/app.js");
await import("./extensions/sora/js/sora_show_text.js");
const extension = registered[0];
class Node { constructor() { this.widgets = []; } }
Node.prototype.addDOMWidget = function (name, type, element, options) {  // as the ComfyUI frontend's
    const widget = {name, type, element, options};
    this.widgets.push(widget);
    return widget;
};
Node.prototype.setDirtyCanvas = function () {};
let seen = null;
Node.prototype.onExecuted = function (output) { seen = output; };
await extension.beforeRegisterNodeDef(Node, {name: "SoraPromptExpansion"});
const other = class {};
await extension.beforeRegisterNodeDef(other, {name: "SoraSampler"});
const node = new Node();
node.onExecuted({text: ["a red ball"]});
node.onExecuted({text: ["a blue square"]});
console.log(JSON.stringify({name: extension.name, widgets: node.widgets.length, text: node.widgets[0].element.value,
    readOnly: node.widgets[0].element.readOnly, serialize: node.widgets[0].serialize, chained: seen !== null,
    untouched: other.prototype.onExecuted === undefined}));
"""


def test_the_web_extension_shows_the_caption_on_the_node(tmp_path):
    import shutil
    import subprocess
    node = shutil.which("node")
    if node is None:
        pytest.skip("node.js is not installed; the extension runs in the browser")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(
        "export const registered = []; export const app = {registerExtension: (e) => registered.push(e)};")
    target = tmp_path / "extensions" / "sora" / "js"
    target.mkdir(parents=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(repo, "web", "js", "sora_show_text.js"), target)
    (tmp_path / "driver.mjs").write_text(EXTENSION_DRIVER)
    done = subprocess.run([node, "driver.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"name": "sora.ShowExpandedPrompt", "widgets": 1, "text": "a blue square",
                                       "readOnly": True, "serialize": False, "chained": True, "untouched": True}
