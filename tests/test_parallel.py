"""Several devices on the CPU (gloo): a DiT call computed by 2 and 4 processes equals one process's, sampling on 2
ranks equals sampling in one, a failing rank stops the run at once with its message, and `sora run --devices
cpu,cpu` writes the frames a single-process run writes.

Each group of processes costs seconds to start, so every check that can share a group does: the functions named
`_on_ranks_*` run in the ranks (spawned, so they live at module level) and send their measurements back to the
test, which judges them.
"""
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sora import nano, parallel_launch
from sora.dit import DiTConfig, WanDiT, load_dit
from sora.errors import InputError
from sora.handle import ModelCall, ModelHandle
from sora.latent_formats import format_of
from sora.parallel import parse_devices
from sora.parallel_launch import ParallelRunner, RankFailed, launch, on_devices, with_models_on_ranks
from sora.samplers import run_sampling

pytestmark = pytest.mark.usefixtures("fresh_manager")

REPO = Path(__file__).resolve().parents[1]
RELATIVE = 1e-5
HEADS = {"heads_divide": (4, 32), "heads_do_not_divide": (3, 36)}  # (heads, width): 4 splits over 2 and 4 ranks, 3 not
LATENT = (16, 3, 10, 2)  # [C, T, H, W] -> 3 x 5 x 1 = 15 tokens: padded on 2 and 4 ranks


def random_dit(path: Path, heads: int, width: int) -> Path:
    """A two-block random DiT file in the original layout (weights large enough that every layer matters)."""
    torch.manual_seed(0)
    model = WanDiT(DiTConfig(dim=width, ffn_dim=64, num_heads=heads, num_layers=2, text_dim=24, text_len=8,
                             freq_dim=16))
    for parameter in model.parameters():
        parameter.data.normal_(0.0, 0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"sora.num_heads": str(heads), "sora.text_len": "8"})
    return path


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dits")
    return {name: random_dit(folder / f"{name}.safetensors", *shape) for name, shape in HEADS.items()}


def relative(out, ref) -> float:
    if isinstance(out, list):
        return max(relative(o, r) for o, r in zip(out, ref))
    return float((out - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------------------------------------------------------
# What the ranks run
# ------------------------------------------------------------------------------------------------------------------

def forward_cases():
    """(name, mode, x, timestep, context, call): padding, per-token timesteps, two sizes, two guidance passes."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *LATENT, generator=gen)
    t = torch.rand(2, generator=gen) * 1000
    context = torch.randn(2, 5, 24, generator=gen)
    context[1, 3:] = 0  # a shorter prompt
    per_token = torch.rand(2, 15, generator=gen) * 1000
    sizes = [torch.randn(*LATENT, generator=gen), torch.randn(16, 2, 4, 4, generator=gen)]
    passes = ModelCall(0, 4, 0.5, ("cond", "uncond"))
    return [("padded sequence", "ulysses", x, t, context, None),
            ("per-token timesteps", "auto", x, per_token, context, None),
            ("two sizes", "auto", sizes, t, context, None),
            ("two sizes, per-token timesteps", "ulysses", sizes, per_token, context, None),
            ("guidance passes, auto", "auto", x, t, context, passes),
            ("guidance passes, cfg only", "cfg", x, t, context, passes),
            ("guidance passes, sequence only", "ulysses", x, per_token, context, passes)]


def _on_ranks_forward(server, files: dict):
    """Every rank computes every case together; rank 0 also alone, and reports the differences."""
    errors = {}
    for name, path in files.items():
        handle = ModelHandle(load_dit(path, compute_dtype=torch.float32))
        for case, mode, x, t, context, call in forward_cases():
            out = server.ranks.forward(handle, mode, x, t, context, call)
            if server.ranks.rank == 0:
                errors[f"{name}: {case}"] = relative(out, handle(x, t, context, call))
    return {"errors": errors, "traffic": server.ranks.traffic}


def sampling_inputs():
    """The nano model's latent with its first latent frame known, and two prompts."""
    gen = torch.Generator().manual_seed(2)
    fmt = format_of("nano")
    latent = torch.zeros(1, fmt.channels, 3, 4, 4)
    latent[:, :, 0] = torch.randn(1, fmt.channels, 4, 4, generator=gen)
    mask = torch.ones(1, 1, 3, 4, 4)
    mask[:, :, 0] = 0
    positive, negative = torch.randn(1, 6, 384, generator=gen), torch.randn(1, 3, 384, generator=gen)
    sigmas = torch.tensor([1.0, 0.6, 0.3, 0.0])
    return latent, sigmas, positive, negative, mask


def _on_ranks_sampling(server, files: dict):
    """The forward cases, then rank 0 samples through the group (every model call on both ranks) and alone."""
    measured = _on_ranks_forward(server, files)
    if server.ranks.rank != 0:
        server.follow()
        return None
    try:
        latent, sigmas, positive, negative, mask = sampling_inputs()
        handle = ModelHandle(load_dit(nano.dit_path(), compute_dtype=torch.float32))
        alone = run_sampling(handle, latent, sigmas, positive, negative, guidance=5.0, seed=3, noise_mask=mask)
        for mode in ("auto", "ulysses"):  # the passes split, then the sequence (per-token timesteps: known frames)
            spread = run_sampling(on_devices(handle, "cpu,cpu", mode), latent, sigmas, positive, negative,
                                  guidance=5.0, seed=3, noise_mask=mask)
            measured["errors"][f"sampling, {mode}"] = relative(spread.latent, alone.latent)
        measured["kept frame"] = float((spread.latent[:, :, 0] - latent[:, :, 0]).abs().max())
    finally:
        server.stop_followers()
    return measured


def _on_ranks_one_raises(server):
    if server.ranks.rank == 1:
        raise ValueError("rank 1 is broken on purpose")
    torch.distributed.barrier()  # waits for a rank that will never come


# ------------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(dits):
    return launch("cpu,cpu", _on_ranks_sampling, (dits,))


def test_two_ranks_forward_matches_one_process(two_ranks):
    errors = {case: e for case, e in two_ranks["errors"].items() if not case.startswith("sampling")}
    assert len(errors) == 2 * len(forward_cases())
    assert max(errors.values()) <= RELATIVE, errors
    traffic = two_ranks["traffic"]
    assert traffic.ulysses and traffic.gathered and traffic.cfg_split and traffic.bytes_sent  # every path ran


def test_four_ranks_forward_matches_one_process(dits):
    measured = launch("cpu,cpu,cpu,cpu", _on_ranks_forward, (dits,))
    assert max(measured["errors"].values()) <= RELATIVE, measured["errors"]
    assert measured["traffic"].ulysses and measured["traffic"].gathered and measured["traffic"].cfg_split


def test_sampling_on_two_ranks_gives_the_single_process_latent(two_ranks):
    assert two_ranks["errors"]["sampling, auto"] <= RELATIVE
    assert two_ranks["errors"]["sampling, ulysses"] <= RELATIVE
    assert two_ranks["kept frame"] == 0.0  # known frames come back exactly


def test_a_rank_that_raises_fails_the_run_fast_with_its_message():
    start = time.monotonic()
    with pytest.raises(RankFailed) as failed:
        launch("cpu,cpu", _on_ranks_one_raises)
    assert failed.value.rank == 1 and "rank 1 is broken on purpose" in str(failed.value)
    assert "ValueError" in failed.value.trace
    assert time.monotonic() - start < 60  # not the collectives' 30-minute timeout


def test_a_worker_group_serves_calls_until_its_model_is_unloaded():
    """The Sora Parallel node's path: workers started on first use, kept between runs, gone with the model."""
    latent, sigmas, positive, negative, mask = sampling_inputs()
    model = load_dit(nano.dit_path(), compute_dtype=torch.float32)
    alone = run_sampling(ModelHandle(model), latent, sigmas, positive, negative, guidance=5.0, seed=3)
    spread = on_devices(ModelHandle(model), "cpu,cpu")
    group = parallel_launch.worker_group(parse_devices("cpu,cpu"))
    assert not group.running  # nothing starts before the first call
    first = run_sampling(spread, latent, sigmas, positive, negative, guidance=5.0, seed=3)
    pids = group.pids()
    second = run_sampling(spread, latent, sigmas, positive, negative, guidance=5.0, seed=3)
    assert group.pids() == pids and len(pids) == 2
    assert relative(first.latent, alone.latent) <= RELATIVE and torch.equal(first.latent, second.latent)
    del spread, model
    gc.collect()
    assert not group.running
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sora_run_on_two_cpu_processes_writes_the_single_process_frames(tmp_path):
    from sora.video_io import read_video
    workflow = REPO / "workflows" / "nano_t2v.json"  # the editor's format, as a user has it
    ids = {node["type"]: node["id"] for node in json.loads(workflow.read_text())["nodes"]}
    scheduler, empty, save = ids["SoraScheduler"], ids["SoraEmptyLatentVideo"], ids["SoraSaveVideo"]
    # crf 0: lossless, so that the files hold the frames themselves
    settings = (f"{scheduler}.steps=2", f"{empty}.frames=5", f"{empty}.width=32", f"{empty}.height=32",
                f"{save}.crf=0")
    arguments = [sys.executable, "-m", "sora", "run", str(workflow),
                 *[a for value in settings for a in ("--set", value)]]
    # both as a user runs them: fresh processes (this one's torch settings are the earlier tests')
    runs = {devices: subprocess.run([*arguments, "--output-dir", str(tmp_path / name), *devices], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=180)
            for name, devices in (("one", ()), ("two", ("--devices", "cpu,cpu")))}
    for done in runs.values():
        assert done.returncode == 0, done.stderr
    assert "running the diffusion model on 2 processes: cpu, cpu" in runs[("--devices", "cpu,cpu")].stderr
    one, two = (read_video(done.stdout.strip()).frames for done in runs.values())
    assert one.shape == two.shape == (5, 32, 32, 3)
    assert (one - two).abs().max() <= 1 / 255


# -- without processes ----------------------------------------------------------------------------------------------

def test_device_lists_are_checked():
    assert parse_devices(" cpu, cpu ") == (torch.device("cpu"),) * 2
    for bad, message in (("", "empty"), ("cpu,gpu", "not a device"), ("cuda", "needs an index"),
                         ("mps:0", "only"), ("cpu,cuda:0", "mix")):
        with pytest.raises(InputError, match=message):
            parse_devices(bad)


def test_a_model_without_a_file_cannot_go_to_the_workers():
    model = WanDiT(DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=24, text_len=8, freq_dim=16))
    with pytest.raises(InputError, match="not loaded from a file"):
        on_devices(ModelHandle(model), "cpu,cpu")


def test_devices_gives_every_loaded_model_to_the_ranks(monkeypatch):
    from sora.nodes import load_node_mappings
    classes = load_node_mappings()[0]
    monkeypatch.setattr(parallel_launch, "_server", SimpleNamespace(devices=parse_devices("cpu,cpu")))
    wrapped = with_models_on_ranks(classes)
    changed = {name for name in classes if wrapped[name] is not classes[name]}
    assert "SoraModelLoader" in changed and not changed & {"SoraLoraLoader", "SoraParallel", "SoraSampler"}
    loader = wrapped["SoraModelLoader"]
    assert loader.__name__ == "SoraModelLoader" and loader.INPUT_TYPES() == classes["SoraModelLoader"].INPUT_TYPES()
    (handle,) = loader().load("nano (embedded)", "default", "fp32", "sdpa", "auto (from the file name)")
    assert isinstance(handle.runner, ParallelRunner) and handle.runner.devices == parse_devices("cpu,cpu")
