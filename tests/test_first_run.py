"""What a new user meets: the main job in their own words, long prompts, checks before anything runs, one file per
seed, and the smaller stumbles (`--version`, `sora inputs`, `--smoke`, the help's example, Python use)."""
import contextlib
import io
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sora import cli, runtime, text, workflow
from sora.nodes import loaders, sampling, text_encode
from sora.workflow import WorkflowError, apply_overrides, load_workflow

pytestmark = pytest.mark.usefixtures("fresh_manager")  # a memory manager of this module's own

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = REPO / "workflows" / "nano_t2v.json"
CLASSES = __import__("sora.nodes", fromlist=["load_node_mappings"]).load_node_mappings()[0]


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def nano_encoder():
    return loaders.SoraTextEncoderLoader().load(loaders.MINILM, "default", "auto")[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. Own words on the main job; 2. long prompts
# ---------------------------------------------------------------------------------------------------------------

def test_the_main_job_recaptions_the_users_words_and_says_what_it_guessed():
    encoder = nano_encoder()
    returned = text_encode.SoraTextEncode().encode(encoder, "a crimson ball rolling right", "none", "")
    shown = returned["ui"]["text"][0]
    assert shown == "encoded: a red circle moving to the right"
    # encoded exactly as the caption would be
    expected = text_encode.SoraTextEncode().encode(encoder, "a red circle moving to the right", "none", "",
                                                   recaption="off")
    torch.testing.assert_close(returned["result"][0][0][0], expected[0][0][0], rtol=0, atol=0)
    guessed = text_encode.SoraTextEncode().encode(encoder, "a cat surfing at sunset", "none", "")
    notes = guessed["ui"]["text"][0]
    assert "no direction in the prompt" in notes and "chosen by the seed" in notes  # no silent seed choice


def test_recaption_off_and_umt5_encode_the_prompt_as_typed(models, monkeypatch):
    encoder = nano_encoder()
    typed = text_encode.SoraTextEncode().encode(encoder, "a crimson ball rolling right", "none", "",
                                                recaption="off")
    assert not isinstance(typed, dict)  # nothing to report
    direct, lengths = text.encode_prompts(encoder, ["a crimson ball rolling right"])
    torch.testing.assert_close(typed[0][0][0][:, :int(lengths[0])], direct[:, :int(lengths[0])], rtol=0, atol=0)
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    runtime.configure(models_dir=models)
    umt5 = loaders.SoraTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "default", "auto")[0]
    assert not isinstance(text_encode.SoraTextEncode().encode(umt5, "a crimson ball", "wan default", ""), dict)


def test_the_main_job_uses_the_recaption_path():
    prompt = load_workflow(MAIN_JOB, CLASSES).prompt
    (encode,) = [n for n in prompt.values() if n["class_type"] == "SoraTextEncode"]
    assert encode["inputs"]["recaption"] == "auto"


def test_a_long_prompt_is_cut_at_the_text_encode_with_a_note_and_samples(caplog):
    encoder = nano_encoder()
    long_prompt = "a red circle moving to the right on a dark background " + "with soft light " * 12
    assert encoder.token_count(long_prompt) > 32
    with caplog.at_level(logging.WARNING):
        returned = text_encode.SoraTextEncode().encode(encoder, long_prompt, "none", "", recaption="off")
    note = returned["ui"]["text"][0]
    assert f"the prompt has {encoder.token_count(long_prompt)} tokens, but minilm-l6 reads at most 32" in note
    assert "reads at most 32" in caplog.text
    positive, negative = returned["result"]
    assert positive[0][0].shape[1] == 32
    model = loaders.SoraModelLoader().load(loaders.NANO, "default", "auto", "sdpa", loaders.AUTO_EXPERT)[0]
    sigmas = sampling.SoraScheduler().schedule(model, 2, 0.0, "wan_unipc", 1.0)[0]
    latent = sampling.SoraEmptyLatentVideo().generate(model, 64, 64, 9, 1)[0]
    out = sampling.SoraSampler().sample(model, positive, negative, latent, sigmas, 1, 5.0, "unipc", 1.0)[0]
    assert torch.isfinite(out["samples"]).all()


def test_the_sampler_cuts_a_context_longer_than_the_model_reads_with_a_warning(caplog):
    model = loaders.SoraModelLoader().load(loaders.NANO, "default", "auto", "sdpa", loaders.AUTO_EXPERT)[0]
    context = torch.randn(1, 40, model.config.text_dim)
    cond = [[context, {"attention_mask": torch.ones(1, 40, dtype=torch.long)}]]
    sigmas = sampling.SoraScheduler().schedule(model, 1, 0.0, "wan_unipc", 1.0)[0]
    latent = sampling.SoraEmptyLatentVideo().generate(model, 64, 64, 5, 1)[0]
    with caplog.at_level(logging.WARNING):
        out = sampling.SoraSampler().sample(model, cond, cond, latent, sigmas, 1, 5.0, "unipc", 1.0)[0]
    assert "holds up to 40 text tokens" in caplog.text and torch.isfinite(out["samples"]).all()


# ---------------------------------------------------------------------------------------------------------------
# 3. Every check before anything runs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("9.filename_prefix=../x",
     "node #9 (SoraSaveVideo), input 'filename_prefix': filename_prefix '../x' contains '..'"),
    ("9.filename_prefix=/abs/path", "input 'filename_prefix': filename_prefix '/abs/path' is an absolute path"),
    ("6.width=63", "node #6 (SoraEmptyLatentVideo), input 'width': 63 is not a multiple of 16"),
    ("6.frames=10", "node #6 (SoraEmptyLatentVideo), input 'frames': 10 is not 1+4k"),
])
def test_bad_values_fail_before_any_node_runs(setting, message, tmp_path, monkeypatch):
    ran = []
    for cls in CLASSES.values():
        monkeypatch.setattr(cls, cls.FUNCTION, lambda *a, _cls=cls, **k: ran.append(_cls.__name__), raising=False)
    code, out, err = run_cli("run", MAIN_JOB, "--output-dir", tmp_path / "out", "--set", setting)
    assert code == 1 and message in err and not ran and not (tmp_path / "out").exists()


def test_a_bad_filename_prefix_fails_in_under_five_seconds_as_a_user_runs_it(tmp_path):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sora", "run", str(MAIN_JOB), "--output-dir", str(tmp_path),
                           "--set", "9.filename_prefix=../x"], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert done.returncode == 1 and "input 'filename_prefix'" in done.stderr
    assert "[1/" not in done.stderr  # no node started
    assert took < 5.0, took


def test_linked_values_are_checked_when_they_exist():
    assert sampling.SoraEmptyLatentVideo.VALIDATE_INPUTS(width=None, height=None, frames=None) is True
    assert "multiple of 16" in sampling.SoraEmptyLatentVideo.VALIDATE_INPUTS(width=63)
    assert "outside 16..8192" in sampling.SoraEmptyLatentVideo.VALIDATE_INPUTS(width=0)


# ---------------------------------------------------------------------------------------------------------------
# 4. One seed, one file
# ---------------------------------------------------------------------------------------------------------------

def test_the_main_job_gives_the_same_file_for_a_seed_in_one_process(tmp_path):
    files = []
    for run in range(3):
        code, out, err = run_cli("run", MAIN_JOB, "--output-dir", tmp_path / str(run), "--set", "5.steps=4")
        assert code == 0, err
        files.append(Path(out.split()[-1]).read_bytes())
    assert files[0] == files[1] == files[2]


# ---------------------------------------------------------------------------------------------------------------
# 6. Smaller stumbles
# ---------------------------------------------------------------------------------------------------------------

def test_version():
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()) as out:
        cli.main(["--version"])
    import sora
    assert done.value.code == 0 and out.getvalue().strip() == f"sora {sora.__version__}"


def test_inputs_lists_the_nodes_and_what_set_can_change():
    code, out, _ = run_cli("inputs", MAIN_JOB)
    assert code == 0
    assert "#4 SoraTextEncode" in out and "--set 7.seed=42" in out and "--set 6.width=64    INT 16..8192" in out
    assert "--set 4.recaption=auto    one of: auto, off" in out
    assert "clip" not in out.split("#7")[1].split("#8")[0]  # links (the latent) are not listed


def test_the_help_example_names_real_nodes_and_inputs_of_the_main_job():
    parser = cli.build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    help_text = " ".join(run.format_help().split())
    assert "workflows/nano_t2v.json" in help_text
    examples = re.findall(r"--set (\d+\.\w+)=(?:'([^']*)'|([^\s;']+))", help_text)
    assert len(examples) == 2
    overrides = [f"{target}={quoted or plain}" for target, quoted, plain in examples]
    prompt = apply_overrides(load_workflow(MAIN_JOB, CLASSES).prompt, overrides, CLASSES)
    assert prompt["7"]["inputs"]["seed"] == 42 and prompt["4"]["inputs"]["prompt"] == "a blue square moving up"


def test_smoke_shrinks_a_wan_workflow_on_the_stand_ins(models, tmp_path):
    code, out, err = run_cli("run", REPO / "workflows" / "wan21_t2v_1.3B.json", "--models-dir", models,
                             "--output-dir", tmp_path, "--smoke", "--set", "6.frames=13")
    assert code == 0, err
    import av
    with av.open(out.split()[-1]) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (frames, stream.codec_context.width, stream.codec_context.height) == (13, 64, 32)  # --set wins


def test_python_use_raises_with_the_node_and_input(tmp_path):
    with pytest.raises(WorkflowError, match=r"node #6 \(SoraEmptyLatentVideo\), input 'frames'"):
        workflow.run(MAIN_JOB, output_dir=tmp_path, overrides=["6.frames=10"])
    files = workflow.run(MAIN_JOB, output_dir=tmp_path, overrides=["5.steps=2"])
    assert len(files) == 1 and files[0].suffix == ".mp4" and files[0].is_file()
