"""The `sora` command, run as a separate process: exit codes, one-line errors, output folder untouched on error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_workflow_nodes import api_graph

TESTS = Path(__file__).resolve().parent
# Runs `sora` with the test node classes plus one that presses Ctrl-C (SIGINT to its own process) while it runs.
DRIVER = """
import os, signal, sys
from sora import cli
from test_workflow_nodes import NODES, CALLS

class TinyCtrlC:
    CATEGORY, FUNCTION, RETURN_TYPES = "test", "press", ("LATENT",)
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}}
    def press(self, latent):
        os.kill(os.getpid(), signal.SIGINT)
        return (latent,)

code = cli.main(sys.argv[1:], node_classes={**NODES, "TinyCtrlC": TinyCtrlC})
print("calls:", ",".join(CALLS), file=sys.stderr)
sys.exit(code)
"""


def sora(*args, cwd, driver=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", DRIVER] if driver else [sys.executable, "-m", "sora"]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def out(tmp_path):
    """An output folder that already holds an earlier result, which must survive every failed run."""
    folder = tmp_path / "OUT"
    (folder / "sora").mkdir(parents=True)
    (folder / "sora" / "clip_00001_.json").write_text("earlier run")
    return folder


def test_run_writes_outputs_and_prints_their_paths(tmp_path, out):
    (tmp_path / "wf.json").write_text(json.dumps(api_graph()))
    done = sora("run", "wf.json", "--output-dir", out, "--set", "4.seed=7", "--set", "6.latent=[\"4\", 0]",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(out / "sora" / "clip_00002_.json")]
    assert "[7/7] TinySave (#7)" in done.stderr
    assert (out / "sora" / "clip_00001_.json").read_text() == "earlier run"
    assert len(json.loads((out / "sora" / "clip_00002_.json").read_text())["frames"]) == 18


def _broken(edit):
    graph = api_graph()
    edit(graph)
    return graph


BROKEN = {
    "unknown class": (_broken(lambda g: g["5"].update(class_type="EmptyHunyuanLatentVideo")), "node #5 "),
    "missing input": (_broken(lambda g: g["4"]["inputs"].pop("positive")), "node #4 (TinySampler), input 'positive'"),
    "bad link": (_broken(lambda g: g["6"]["inputs"].update(latent=["4", 3])), "node #6 (TinyDecode), input 'latent'"),
    "cycle": (_broken(lambda g: (g["4"]["inputs"].update(latent=["9", 0]), g["9"]["inputs"].update(latent=["4", 0]))),
              "cycle: #4 (TinySampler) needs #9 (TinyBoost) needs #4"),
    "bad widget value": (_broken(lambda g: g["5"]["inputs"].update(frames=-3)), "node #5 (TinyEmpty), input 'frames'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_graph_exits_nonzero_with_one_line_and_leaves_out_unchanged(case, tmp_path, out):
    graph, expected = BROKEN[case]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    before = snapshot(out)
    done = sora("run", "wf.json", "--output-dir", out, cwd=tmp_path)
    assert done.returncode == 1
    error_lines = [line for line in done.stderr.splitlines() if not line.startswith("calls:")]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and expected in error_lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert "calls: \n" in done.stderr + "\n"  # no node ran
    assert snapshot(out) == before


def test_bad_override_is_a_one_line_error(tmp_path, out):
    (tmp_path / "wf.json").write_text(json.dumps(api_graph()))
    before = snapshot(out)
    done = sora("run", "wf.json", "--output-dir", out, "--set", "4.steps=500", cwd=tmp_path)
    assert done.returncode == 1 and "node #4 (TinySampler), input 'steps': 500 is above the maximum 100" in done.stderr
    assert snapshot(out) == before


def test_bug_in_a_node_shows_the_traceback(tmp_path, out):
    graph = api_graph()
    graph["8"] = {"class_type": "TinyCrash", "inputs": {"latent": ["4", 0]}}
    graph["6"]["inputs"]["latent"] = ["8", 0]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    done = sora("run", "wf.json", "--output-dir", out, cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr
    assert "NodeFailed: node #8 (TinyCrash) failed" in done.stderr


def test_ctrl_c_stops_between_nodes(tmp_path, out):
    graph = api_graph()
    graph["8"] = {"class_type": "TinyCtrlC", "inputs": {"latent": ["4", 0]}}
    graph["6"]["inputs"]["latent"] = ["8", 0]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    before = snapshot(out)
    done = sora("run", "wf.json", "--output-dir", out, cwd=tmp_path)
    assert done.returncode == 130, done.stderr
    assert "interrupted: stopped by Ctrl-C" in done.stderr and "Traceback" not in done.stderr
    assert "TinySampler" in done.stderr and "TinyDecode" not in done.stderr.split("calls:")[1]
    assert snapshot(out) == before


def test_python_dash_m_sora_with_the_pack_nodes(tmp_path):
    """The real entry point loads the pack's own nodes; a core-only graph is refused without writing anything."""
    (tmp_path / "wf.json").write_text(json.dumps({"3": {"class_type": "KSampler", "inputs": {}}}))
    done = sora("run", "wf.json", "--output-dir", tmp_path / "OUT", cwd=tmp_path, driver=False)
    assert done.returncode == 1 and "node #3 (KSampler)" in done.stderr and "only runs inside ComfyUI" in done.stderr
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "output").exists()
    usage = sora("run", cwd=tmp_path, driver=False)
    assert usage.returncode == 2 and "workflow" in usage.stderr
