"""The GPU check: every CUDA path of the pack in one command, one table, under 8 minutes on one H200.

    bash benchmarks/device_check.sh                       # on the GPU machine (installs the carried wheels first)
    python benchmarks/device_check.py --dry-run           # the same steps at tiny sizes on the CPU
    python benchmarks/device_check.py --only dit,fp8      # a subset (a rerun)

Steps (each one runs on its own: an error is recorded in its row and the next step starts):

1. tests: the device-dependent tests (those taking the `device` fixture: tests/test_cuda_paths.py,
   tests/test_fp8_matmul.py) with `pytest -m device --device cuda`; and whether every package the check imported
   is in the GPU image or among the carried wheels (IMAGE, and the WHEELS line of device_check.sh).
2. dit: the DiT forward in bf16 against diffusers' WanTransformer3DModel on the same random weights, at Wan 2.1
   1.3B's shape (30 layers) on 832x480x81 (32,760 tokens), and a stack of 14B-shaped blocks (4 of its 40): time
   (median of back-to-back pairs), peak memory, TFLOP/s (the 1.3B against the issue's 2.8e14 FLOP per forward, the
   stack against `forward_flop`), the error of each against a float32 diffusers forward (1.3B) or against each
   other (the stack). Fails when an error passes the bf16 bound or, on CUDA, the 1.3B's ratio ours / diffusers
   passes 1.0.
3. streaming: the 1.3B under a budget of its planned activations plus a quarter of its weights (Sora Memory
   Options' budget) against fully resident, at 32,760 and 1,560 tokens: blocks resident, time, ratio, and
   whether the output is bit for bit the resident one.
4. oom: one guided sampling step of the 1.3B at 480p / 81 under `torch.cuda.set_per_process_memory_fraction` set
   between the memory of one guidance pass and that of two: the batched step must fail, the memory manager must
   retry it smaller, and the result must match the sequential run (on the CPU an injected error stands in).
5. attention: every backend `sora.attention.available_backends()` offers, and each of SDPA's CUDA kernels, on
   1.3B-shaped self-attention (12 heads x 128, 32,760 tokens) in bf16: time, TFLOP/s, error against float32.
6. fp8: `ops.fp8_linear` (torch._scaled_mm) on a 1.3B FFN product against bf16, and the 1.3B forward loaded with
   `FP8_E4M3FN_FAST` against bf16: time, error, and whether every block Linear took the fp8 path.
7. compile: the 1.3B forward in bf16 through Sora Compile Blocks (`sora.compile`, one block graph for every
   layer, dynamic token and text lengths) against eager: the first call (compilation included), the steady-state
   time of back-to-back pairs and its speedup (issue 20's C, measured on a GPU), and the difference against
   eager. Fails when inductor cannot build here (the reason is the row's result) or the difference passes two
   bf16 bounds.
8. sampling: a random 1.3B, 50 UniPC steps with guidance 5 (both passes batched) at 480p / 81 frames, then a
   random Wan 2.1 VAE decodes the clip: time and peak memory of placing the DiT, sampling and decoding. It runs
   last, being the longest, so that a slow decode cannot crowd the other steps out of the deadline (--deadline:
   a step that would start after it is skipped and counts as failed).

The "peak GiB" column is the allocator's peak during the item (CUDA only): for the dit and fp8 rows above the
weights already there, for the streaming rows the weights the memory manager placed.

The last line reads `device_check: steps=N failed=F device=cuda|cpu`.

Beyond the GPU image (torch with CUDA, transformers, safetensors, einops, tqdm, accelerate, pytest, numpy, ...;
IMAGE below) the check needs three wheels, diffusers==0.42.1 (the reference DiT), ftfy==6.3.1 (imported by
sora.text) and its wcwidth==0.9.4 (the WHEELS line of benchmarks/device_check.sh, their one source), carried in
`.whl/` (ignored by git; 7 MB). diffusers' own needs (huggingface-hub >= 1.32, safetensors >= 0.8, numpy, regex,
requests, filelock, Pillow) are in the image. Fetch them here, once, with

    bash benchmarks/device_check.sh fetch

(= python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4), then with the device tool:

    run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=560)

The wrapper installs the wheels into /tmp/site, puts the repository and them on PYTHONPATH, runs this script and
writes the table to $OUT/device_check.txt and the log to $OUT/device_check.log.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import gc
import importlib.metadata
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sora import compile as compiled_blocks
from sora import memory, ops, samplers
from sora.attention import attention, available_backends
from sora.checkpoints import load_into
from sora.dit import DiTConfig, WanDiT, convert_diffusers
from sora.handle import ModelHandle
from sora.memory import MemoryManager, MemoryOptions
from sora.schedules import flow_sigmas
from sora.streaming import module_bytes
from sora.vae import VAEConfig, WanVAE, decode_video

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
DEVICE_TESTS = ("tests/test_cuda_paths.py", "tests/test_fp8_matmul.py")
WRAPPER = REPO / "benchmarks" / "device_check.sh"  # fetches and installs the wheels
# The GPU image's Python packages (the device tool's KINDS.md, read 2026-11-17); `tests` checks our imports against
# these and the wheels.
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
OWN = {"sora-video-dit"}  # this repository (on PYTHONPATH there)
FLOP_1_3B = 2.8e14  # the FLOP of one 1.3B forward at 32,760 tokens (forward_flop gives 2.83e14)


# ------------------------------------------------------------------------------------------------------------------
# Sizes: the real check and the dry run
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What the steps run at. `latent` is [C, T, H, W] (832x480x81 -> 16 x 21 x 60 x 104, 32,760 tokens)."""
    device: torch.device
    dit: DiTConfig
    stack: DiTConfig  # a stack of the 14B's blocks
    stack_of: int  # the real model's layer count, for the extrapolated time
    latent: tuple[int, int, int, int]
    short_latent: tuple[int, int, int, int]  # a one-frame clip: streaming's copies weigh most there
    steps: int
    vae: VAEConfig
    repeats: int
    prompt_tokens: int
    matmul: tuple[int, int, int]  # tokens, in, out of the fp8 product
    test_timeout_s: int
    name: str  # of the DiT, in the rows
    stack_name: str

    @property
    def dry_run(self) -> bool:
        return self.device.type == "cpu"


def real_plan(device: torch.device) -> Plan:
    return Plan(device=device, dit=DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
                stack=DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=4), stack_of=40,
                latent=(16, 21, 60, 104), short_latent=(16, 1, 60, 104), steps=50, vae=VAEConfig.wan21(),
                repeats=3, prompt_tokens=100, matmul=(32760, 1536, 8960), test_timeout_s=240, name="1.3B",
                stack_name="14B blocks")


def dry_plan() -> Plan:
    # 16 blocks large against the rest, as the 1.3B's are: a quarter of the weights holds a resident block
    tiny = dict(text_dim=16, text_len=16, freq_dim=16)
    return Plan(device=torch.device("cpu"), dit=DiTConfig(dim=64, ffn_dim=256, num_heads=2, num_layers=16, **tiny),
                stack=DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, **tiny), stack_of=8,
                latent=(16, 3, 8, 8), short_latent=(16, 1, 8, 8), steps=2, vae=VAEConfig.tiny(z_dim=16),
                repeats=1, prompt_tokens=5, matmul=(32, 64, 64), test_timeout_s=300, name="tiny DiT",
                stack_name="wider blocks")


def tokens_of(config: DiTConfig, latent: tuple[int, int, int, int]) -> int:
    return math.prod(s // p for s, p in zip(latent[1:], config.patch_size))


def forward_flop(config: DiTConfig, tokens: int) -> float:
    """FLOP of one forward (batch 1): per layer the self-attention projections (4·D²) and the cross-attention's
    query and output (2·D²) and the FFN (2·D·F) per token, the cross-attention's keys and values over the text
    (2·D² per text token), attention scores and their weighted sum (2·L·D each for L keys); 2 FLOP per MAC."""
    D, L, S = config.dim, tokens, config.text_len
    per_layer = 2 * (L * (6 * D * D + 2 * D * config.ffn_dim) + 2 * S * D * D + 2 * L * L * D + 2 * L * S * D)
    return config.num_layers * per_layer


# ------------------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    step: str
    item: str
    ok: bool = True
    seconds: float | None = None
    peak_gib: float | None = None
    result: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(fn: Callable, device: torch.device, extra: bool = False):
    """(fn(), seconds, the allocator's peak GiB during the call on CUDA, else None); `extra`: the peak above what
    was allocated before the call."""
    sync(device)
    before = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if extra else 0
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - before) / GiB if device.type == "cuda" else None
    return out, seconds, peak


def paired_times(first: Callable, second: Callable, repeats: int, device: torch.device):
    """Median seconds of each and the median ratio first / second of back-to-back pairs (order alternating)."""
    times = {0: [], 1: []}
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            times[which].append(measured((first, second)[which], device)[1])
    ratio = statistics.median(a / b for a, b in zip(times[0], times[1]))
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.2f} MiB"


def rate(flop_per_s: float) -> str:
    return f"{flop_per_s / 1e12:.0f} TFLOP/s" if flop_per_s >= 1e12 else f"{flop_per_s / 1e9:.2f} GFLOP/s"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the measure of benchmarks/dit_forward.py)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bf16_tolerance(layers: int) -> float:
    """The bf16 rounding bound of a DiT forward against float32, 4·eps·sqrt(layers) (benchmarks/dit_forward.py)."""
    return 4 * 2**-8 * math.sqrt(layers)


# ------------------------------------------------------------------------------------------------------------------
# Random models on the device
# ------------------------------------------------------------------------------------------------------------------

def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Weights of a sensible scale (randn / sqrt(fan-in), modulation tables halved), drawn on their device."""
    with torch.no_grad():
        for p in module.parameters():
            generator = torch.Generator(p.device).manual_seed(seed)
            seed += 1
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=generator, device=p.device) / math.sqrt(fan_in)
                    * (0.5 if p.ndim == 3 else 1.0))


def our_dit(config: DiTConfig, device: torch.device, seed: int = 0) -> WanDiT:
    """A random WanDiT on `device` with bf16 weights and bf16 compute, as `load_dit` gives a bf16 file."""
    with torch.device(device):
        model = WanDiT(config)
    randomize_(model, seed)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model.set_compute(dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def diffusers_pair(config: DiTConfig, device: torch.device, with_float32: bool):
    """(ours, diffusers in bf16 as `from_pretrained(torch_dtype=bf16)` loads it, float32 diffusers or None) on one
    set of random weights rounded to bf16; ours shares diffusers' bf16 tensors."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        ref = WanTransformer3DModel(
            num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, in_channels=config.in_dim,
            out_channels=config.out_dim, text_dim=config.text_dim, freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim, num_layers=config.num_layers)
    randomize_(ref, seed=0)
    keep = ref._keep_in_fp32_modules or []
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16))  # both models hold exactly these values
    float32 = copy.deepcopy(ref).eval().requires_grad_(False) if with_float32 else None
    for name, p in ref.named_parameters():
        if not any(part in keep for part in name.split(".")):
            p.data = p.data.to(torch.bfloat16)
    ref = ref.eval().requires_grad_(False)
    with torch.device("meta"):
        ours = WanDiT(config)
    load_into(ours, {k: v.to(torch.bfloat16) for k, v in convert_diffusers(ref.state_dict()).items()},
              what="Wan DiT")
    ours.set_compute(dtype=torch.bfloat16)
    return ours.eval().requires_grad_(False), ref, float32


def dit_inputs(plan: Plan, config: DiTConfig, latent, batch: int = 1, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *latent, generator=generator)
    context = torch.randn(batch, plan.prompt_tokens, config.text_dim, generator=generator)
    return x.to(plan.device), torch.full((batch,), 875.0, device=plan.device), context.to(plan.device)


# ------------------------------------------------------------------------------------------------------------------
# 1. tests
# ------------------------------------------------------------------------------------------------------------------

def wheels() -> set[str]:
    """The distributions the wrapper carries (its WHEELS="name==version ..." line)."""
    line = re.search(r'^WHEELS="([^"]*)"', WRAPPER.read_text(encoding="utf-8"), re.MULTILINE)
    if line is None:
        raise RuntimeError(f"{WRAPPER} has no WHEELS=\"...\" line")
    return {re.sub(r"[-_.]+", "-", spec.partition("==")[0]).lower() for spec in line[1].split()}


def check_tests(plan: Plan) -> list[Row]:
    with tempfile.TemporaryDirectory() as folder:
        report, imports = Path(folder) / "report.xml", Path(folder) / "imports.txt"
        command = [sys.executable, str(Path(__file__).resolve()), "--pytest-child", "-q", "-p", "no:cacheprovider",
                   "-m", "device", "--device", str(plan.device), f"--junitxml={report}", *DEVICE_TESTS]
        env = {**os.environ, "SORA_CHECK_IMPORTS": str(imports)}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=plan.test_timeout_s)
        seconds = time.perf_counter() - start
        if not report.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return [Row("tests", "pytest -m device", False, seconds, None, f"no report (exit {done.returncode}): "
                                                                          + " | ".join(tail))]
        counts, failed = junit_counts(report)
        child = set(imports.read_text().split()) if imports.exists() else set()
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
              f"{counts['skipped']} skipped")
    if failed:
        result += "; first failing: " + ", ".join(failed[:3])
    rows = [Row("tests", f"pytest -m device --device {plan.device}", done.returncode == 0 and passed > 0, seconds,
                None, result)]
    missing = sorted((imported_distributions() | child) - IMAGE - wheels() - OWN)
    rows.append(Row("tests", "imports covered by image + wheels", not missing, None, None,
                    "all" if not missing else "missing: " + ", ".join(missing)))
    return rows


def junit_counts(report: Path) -> tuple[dict[str, int], list[str]]:
    """({tests, failures, errors, skipped}, names of failed tests) of a pytest --junitxml report."""
    root = ElementTree.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name", "?") for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return counts, failed


def imported_distributions() -> set[str]:
    """Distributions (normalised names) that the repository's modules loaded in this process import at module level
    (needed to import them at all), and that this script imports anywhere (its steps' lazy imports). Lazy imports
    elsewhere serve features the check does not use (GGUF files, video files); the wheels' own dependencies are
    listed in the module docstring."""
    owners = importlib.metadata.packages_distributions()
    names = set()
    for module in list(sys.modules.values()):
        file = Path(getattr(module, "__file__", None) or "")
        if not file.is_absolute() or file.suffix != ".py" or REPO not in file.resolve().parents \
                or ".venv" in file.parts or not file.is_file():
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        at_top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.partition(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and (id(node) in at_top or file == Path(__file__).resolve()):
                    names.update(re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(top, ()))
    return names


def pytest_child(args: list[str]) -> int:
    """`--pytest-child`: run pytest in this process, then write the distributions it imported."""
    import pytest

    code = pytest.main(args)
    Path(os.environ["SORA_CHECK_IMPORTS"]).write_text("\n".join(sorted(imported_distributions())))
    return int(code)


# ------------------------------------------------------------------------------------------------------------------
# 2. dit: ours against diffusers
# ------------------------------------------------------------------------------------------------------------------

def check_dit(plan: Plan) -> list[Row]:
    rows = [dit_row(plan, plan.dit, f"{plan.name} {plan.dit.num_layers}L", FLOP_1_3B if not plan.dry_run else None,
                    with_float32=True)]
    rows.append(dit_row(plan, plan.stack, f"{plan.stack_name} {plan.stack.num_layers}/{plan.stack_of}L", None,
                        with_float32=False))
    return rows


def dit_row(plan: Plan, config: DiTConfig, name: str, flop: float | None, with_float32: bool) -> Row:
    device = plan.device
    ours, ref, float32 = diffusers_pair(config, device, with_float32)
    x, t, context = dit_inputs(plan, config, plan.latent)
    padded = F.pad(context, (0, 0, 0, config.text_len - context.shape[1]))  # diffusers' pipeline pads to 512
    x_ref, padded_ref = x.to(torch.bfloat16), padded.to(torch.bfloat16)
    tokens = tokens_of(config, plan.latent)
    flop = flop or forward_flop(config, tokens)

    def run_ours():
        return ours(x, t, context)

    def run_ref():
        return ref(x_ref, t, padded_ref, return_dict=False)[0].float()

    with torch.no_grad():
        out, expected = run_ours(), run_ref()  # warm-up
        _, _, peak_ours = measured(run_ours, device, extra=True)
        _, _, peak_ref = measured(run_ref, device, extra=True)
        seconds, seconds_ref, ratio = paired_times(run_ours, run_ref, plan.repeats, device)
        if float32 is not None:
            exact = float32(x, t, padded, return_dict=False)[0]
            errors = (rel_err(out, exact), rel_err(expected, exact))
            error_text = f"err {errors[0]:.2e} (diffusers {errors[1]:.2e}) vs float32"
            bound = bf16_tolerance(config.num_layers)
        else:
            errors = (rel_err(out, expected),)
            error_text = f"err {errors[0]:.2e} vs diffusers bf16"
            bound = 2 * bf16_tolerance(config.num_layers)  # two bf16 forwards, each within the bound
    finite = bool(torch.isfinite(out).all())
    slow = not plan.dry_run and config is plan.dit and ratio > 1.0
    ok = finite and errors[0] <= bound and not slow
    peak = f"peak above weights ours {peak_ours:.1f} / diffusers {peak_ref:.1f} GiB; " \
        if peak_ours is not None else ""
    extra = f" = {seconds * plan.stack_of / config.num_layers:.2f} s for {plan.stack_of}L" \
        if config is plan.stack else ""
    result = (f"{tokens} tokens; ours {seconds * 1e3:.0f} ms{extra}, diffusers {seconds_ref * 1e3:.0f} ms, "
              f"ratio {ratio:.3f}{' (> 1.0)' if slow else ''}; {rate(flop / seconds)} ours, "
              f"{rate(flop / seconds_ref)} diffusers; {peak}{error_text}, bound {bound:.2e}"
              + ("" if finite else "; NON-FINITE output"))
    return Row("dit", name, ok, seconds, peak_ours, result)


# ------------------------------------------------------------------------------------------------------------------
# 3. sampling: 50 guided steps and the VAE decode
# ------------------------------------------------------------------------------------------------------------------

def check_sampling(plan: Plan) -> list[Row]:
    device, manager = plan.device, memory.get_manager()
    model = our_dit(plan.dit, device).to("cpu")  # as a loader leaves it: in host memory, the manager places it
    manager.register(model, name=f"random {plan.name}")
    generator = torch.Generator().manual_seed(2)
    positive = torch.randn(1, plan.prompt_tokens, plan.dit.text_dim, generator=generator)
    negative = torch.randn(1, plan.prompt_tokens // 2, plan.dit.text_dim, generator=generator)
    latent = torch.zeros(1, *plan.latent)
    rows = []

    def place():
        with manager.use(model) as placement:
            return placement
    placement, seconds, peak = measured(place, device)
    rows.append(Row("sampling", "place DiT", placement.location == "resident", seconds, peak,
                    f"{size(module_bytes(model))} of weights {placement.location} on {placement.device}"))

    def sample():
        return samplers.sample(model, latent, flow_sigmas(plan.steps, 5.0), positive, negative, guidance=5.0,
                               sampler="unipc", seed=3)
    raw, seconds, peak = measured(sample, device)
    finite = bool(torch.isfinite(raw).all())
    rows.append(Row("sampling", f"{plan.steps} steps, guidance 5, batched", finite, seconds, peak,
                    f"{tokens_of(plan.dit, plan.latent)} tokens x 2 passes; {seconds / plan.steps:.2f} s/step"
                    + ("" if finite else "; NON-FINITE latent")))

    vae = WanVAE(plan.vae)  # torch's default initialisation: random, of a sensible scale
    vae = vae.to(torch.bfloat16 if not plan.dry_run else torch.float32).eval().requires_grad_(False)
    manager.register(vae, name="random Wan 2.1 VAE")
    video, seconds, peak = measured(lambda: decode_video(vae, raw.to(device)), device)
    finite = bool(torch.isfinite(video).all())
    rows.append(Row("sampling", "VAE decode", finite and video.shape[2] == 1 + 4 * (plan.latent[1] - 1), seconds,
                    peak, f"video {list(video.shape)}" + ("" if finite else "; NON-FINITE video")))
    return rows


# ------------------------------------------------------------------------------------------------------------------
# 3. streaming: a quarter of the weights resident against all of them
# ------------------------------------------------------------------------------------------------------------------

def check_streaming(plan: Plan) -> list[Row]:
    manager = memory.get_manager()
    model = our_dit(plan.dit, plan.device)
    manager.register(model, name=f"random {plan.name}")
    handle = ModelHandle(model, f"random {plan.name}")
    rows = [streaming_row(plan, handle, latent) for latent in (plan.latent, plan.short_latent)]
    return rows


def streaming_row(plan: Plan, handle: ModelHandle, latent) -> Row:
    """One forward streamed under the quarter budget against the same forward resident (the handle as it is)."""
    device, manager, model = plan.device, memory.get_manager(), handle.model
    weights = module_bytes(model)
    inputs = dit_inputs(plan, plan.dit, latent)
    activation = model.activation_bytes(inputs, {})
    budget = activation + weights // 4
    streamed = handle.with_memory(budget_bytes=budget)  # what Sora Memory Options sets
    with torch.no_grad():
        reference = handle(*inputs)  # warm-up, resident
        resident_times = [measured(lambda: handle(*inputs), device)[1] for _ in range(plan.repeats)]
        out = streamed(*inputs)  # warm-up: the model is placed for streaming
        manager.reset_peak()
        streamed_times = [measured(lambda: streamed(*inputs), device)[1] for _ in range(plan.repeats)]
        placement = manager.state(model)
        peak_placed = manager.peak_placed_bytes
        handle(*inputs)  # resident again for whatever runs next
    same = torch.equal(out, reference)
    seconds, resident = statistics.median(streamed_times), statistics.median(resident_times)
    ok = same and placement.location == "streamed" and peak_placed + activation <= budget
    return Row("streaming", f"1/4 budget, {tokens_of(plan.dit, latent)} tokens", ok, seconds, peak_placed / GiB,
               f"{placement.blocks_resident}/{plan.dit.num_layers} blocks resident; streamed {seconds * 1e3:.0f} ms, "
               f"resident {resident * 1e3:.0f} ms, ratio {seconds / resident:.2f}; identical "
               f"{'yes' if same else 'NO'}; peak placed {size(peak_placed)} of {size(weights)} (budget "
               f"{size(budget)} with {size(activation)} of activations)")


# ------------------------------------------------------------------------------------------------------------------
# 4. oom: a guided step under a memory fraction between one pass and two
# ------------------------------------------------------------------------------------------------------------------

class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def check_oom(plan: Plan) -> list[Row]:
    device, manager = plan.device, memory.get_manager()
    model = our_dit(plan.dit, device)
    manager.register(model, name=f"random {plan.name}")
    generator = torch.Generator().manual_seed(4)
    positive = torch.randn(1, plan.prompt_tokens, plan.dit.text_dim, generator=generator)
    negative = torch.randn(1, plan.prompt_tokens, plan.dit.text_dim, generator=generator)
    latent = torch.zeros(1, *plan.latent)

    def step(batched: bool):
        return samplers.sample(model, latent, flow_sigmas(1, 5.0), positive, negative, guidance=5.0, seed=3,
                               batched_cfg=batched)

    reference = step(batched=False)
    one_pass = model.activation_bytes(dit_inputs(plan, plan.dit, plan.latent), {})
    warnings = Warnings()
    logging.getLogger("sora.memory").addHandler(warnings)
    limit_text = ""
    try:
        with memory_limit(plan, model, one_pass) as limit_text:
            out, seconds, peak = measured(lambda: step(batched=True), device)
    finally:
        logging.getLogger("sora.memory").removeHandler(warnings)
    retried = [m for m in warnings.messages if m.startswith("out of memory")]
    same = torch.equal(out, reference)
    close = rel_err(out, reference) <= 1e-3
    result = (f"{limit_text}; {len(retried)} retr{'y' if len(retried) == 1 else 'ies'}: "
              + " | ".join(m.split("retrying after ")[-1] for m in retried)
              + f"; {'identical to' if same else 'close to' if close else 'DIFFERS from'} the sequential run")
    if not retried:
        result += "; NO out-of-memory error: the limit was too generous"
    return [Row("oom", "guided step, fraction between 1 and 2 passes", bool(retried) and close, seconds, peak,
                result)]


@contextlib.contextmanager
def memory_limit(plan: Plan, model: WanDiT, one_pass: int):
    """On CUDA: the process may hold what it holds now (the weights) plus 1.25 times one guidance pass's planned
    activations and 128 MiB: one pass peaks below its plan, two above 1.6 times it (the plan bounds the measured
    peak within 25%, tests/test_memory_streaming.py). On the CPU: an injected error in the first block's first
    call. Yields a description."""
    device = plan.device
    if device.type != "cuda":
        state = {"left": 1}

        def hook(module, args):
            if state["left"]:
                state["left"] -= 1
                raise torch.OutOfMemoryError("out of memory (injected by the dry run)")
        handle = model.blocks[0].register_forward_pre_hook(hook)
        try:
            yield "injected error (CPU)"
        finally:
            handle.remove()
        return
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    limit = torch.cuda.memory_reserved(device) + int(1.25 * one_pass) + 128 * 2**20
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    try:
        yield f"limit {size(limit)} (weights {size(module_bytes(model))} + 1.25 x one pass {size(one_pass)})"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# ------------------------------------------------------------------------------------------------------------------
# 6. attention backends
# ------------------------------------------------------------------------------------------------------------------

def check_attention(plan: Plan) -> list[Row]:
    device = plan.device
    tokens, heads, head_dim = tokens_of(plan.dit, plan.latent), plan.dit.num_heads, plan.dit.head_dim
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=generator).to(device, torch.bfloat16)
               for _ in range(3))
    rows_of_reference = min(tokens, 1024)  # float32 reference for the first queries (all keys)
    with torch.no_grad():
        expected = attention(q[:, :rows_of_reference].float(), k.float(), v.float())
    flop = 4 * tokens * tokens * heads * head_dim
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
        (backend, lambda b=backend: attention(q, k, v, backend=b)) for backend in available_backends()]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def kernel(which):
            def run():
                with sdpa_kernel(which):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                          v.transpose(1, 2)).transpose(1, 2)
            return run
        for which in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            variants.append((f"sdpa kernel {which.name.lower()}", kernel(which)))
    rows = []
    for name, run in variants:
        try:
            with torch.no_grad():
                out = run()  # warm-up
                seconds = statistics.median(measured(run, device)[1] for _ in range(plan.repeats))
        except RuntimeError as e:  # an SDPA kernel this GPU or shape does not take: recorded, not a failure
            rows.append(Row("attention", name, name.startswith("sdpa kernel"), None, None,
                            f"not available: {str(e).splitlines()[0][:90]}"))
            continue
        error = rel_err(out[:, :rows_of_reference], expected)
        bound = 4 * torch.finfo(torch.bfloat16).eps * (8 if name == "sageattn" else 1)
        rows.append(Row("attention", name, error <= bound, seconds, None,
                        f"{tokens} tokens x {heads} heads x {head_dim}; {seconds * 1e3:.1f} ms, "
                        f"{rate(flop / seconds)}; err {error:.2e} (bound {bound:.2e})"))
    return rows


# ------------------------------------------------------------------------------------------------------------------
# 7. fp8
# ------------------------------------------------------------------------------------------------------------------

def check_fp8(plan: Plan) -> list[Row]:
    device = plan.device
    fast_units = ops.fp8_matmul_available(device)
    rows = [fp8_product_row(plan)]
    model = our_dit(plan.dit, device)
    fast = copy.deepcopy(model)
    ops.cast_weights(fast, ops.FP8_E4M3FN_FAST)
    inputs = dit_inputs(plan, plan.dit, plan.latent)
    with torch.no_grad():
        reference, out = model(*inputs), fast(*inputs)  # warm-up
        with counting_fp8_calls() as calls:
            _, _, peak = measured(lambda: fast(*inputs), device, extra=True)
        took = len(calls)
        seconds, seconds_bf16, ratio = paired_times(lambda: fast(*inputs), lambda: model(*inputs), plan.repeats,
                                                    device)
    block_linears = sum(isinstance(m, ops.Linear) for m in fast.blocks.modules())
    error = rel_err(out, reference)
    bound = 0.5  # a sanity bar (still the same function); each product's precision is bounded in test_fp8_matmul
    path_ok = took >= block_linears if fast_units else took == 0
    rows.append(Row("fp8", f"{plan.name} forward, fp8_e4m3fn_fast",
                    path_ok and error <= bound and bool(torch.isfinite(out).all()), seconds, peak,
                    f"{'fp8 units' if fast_units else 'no fp8 units: upcast'}; {took} fp8 products per forward "
                    f"({block_linears} block Linears); {seconds * 1e3:.0f} ms vs bf16 {seconds_bf16 * 1e3:.0f} ms, "
                    f"ratio {ratio:.2f}; err {error:.2e} vs bf16 (bound {bound:.2e})"))
    return rows


@contextlib.contextmanager
def counting_fp8_calls():
    """`ops.fp8_linear` counted inside the block: yields the list of calls."""
    calls, real = [], ops.fp8_linear

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)
    ops.fp8_linear = counted
    try:
        yield calls
    finally:
        ops.fp8_linear = real


def fp8_product_row(plan: Plan) -> Row:
    device = plan.device
    tokens, n_in, n_out = plan.matmul
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, n_in, generator=generator).to(device)
    layer = ops.Linear(n_in, n_out).to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=generator).to(device) * 0.02)
        layer.bias.zero_()
    exact = F.linear(x, layer.weight)
    bf16_weight, x16 = layer.weight.to(torch.bfloat16), x.to(torch.bfloat16)
    ops.cast_weights(layer, ops.FP8_E4M3FN_FAST)
    scale = layer.scale_weight

    def fp8():
        return ops.fp8_linear(x16, layer.weight, scale, None, torch.bfloat16)

    def bf16():
        return F.linear(x16, bf16_weight)

    out, bf16_out = fp8(), bf16()
    fp8_s, bf16_s, ratio = paired_times(fp8, bf16, max(plan.repeats, 3), device)
    flop = 2 * tokens * n_in * n_out
    error, error_bf16 = rel_err(out, exact), rel_err(bf16_out, exact)
    return Row("fp8", f"_scaled_mm {tokens}x{n_in}x{n_out}", error <= 0.15, fp8_s, None,
               f"fp8 {rate(flop / fp8_s)}, bf16 {rate(flop / bf16_s)}, ratio {ratio:.2f}; "
               f"err {error:.2e} (bf16 {error_bf16:.2e}) vs float32")


# ------------------------------------------------------------------------------------------------------------------
# 7. compiled blocks
# ------------------------------------------------------------------------------------------------------------------

def check_compile(plan: Plan) -> list[Row]:
    device, name = plan.device, f"{plan.name} forward, compiled blocks"
    reason = compiled_blocks.unavailable(device)
    if reason is not None:
        return [Row("compile", name, False, None, None, f"not measured: {reason}")]
    eager = ModelHandle(our_dit(plan.dit, device), plan.name)
    fast = compiled_blocks.compile_blocks(eager, device=device)
    inputs = dit_inputs(plan, plan.dit, plan.latent)
    with torch.no_grad():
        expected = eager(*inputs)  # warm-up
        out, first_s, _ = measured(lambda: fast(*inputs), device)
        _, _, peak = measured(lambda: fast(*inputs), device, extra=True)
        seconds, seconds_eager, ratio = paired_times(lambda: fast(*inputs), lambda: eager(*inputs),
                                                     max(plan.repeats, 3), device)
    disabled = next(w.disabled for w in fast.wrappers if isinstance(w, compiled_blocks.CompiledBlocks)) \
        if fast is not eager else "compile_blocks returned the eager handle"
    error, bound = rel_err(out, expected), 2 * bf16_tolerance(plan.dit.num_layers)  # two bf16 forwards
    ok = disabled is None and error <= bound and bool(torch.isfinite(out).all())
    return [Row("compile", name, ok, seconds, peak,
                (f"fell back to eager: {disabled}; " if disabled else "")
                + f"{tokens_of(plan.dit, plan.latent)} tokens; first call {first_s:.1f} s (compilation included), "
                f"steady {seconds * 1e3:.0f} ms vs eager {seconds_eager * 1e3:.0f} ms: compile_speedup="
                f"{1 / ratio:.2f}; err {error:.2e} vs eager (bound {bound:.2e})")]


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------

STEPS: dict[str, Callable[[Plan], list[Row]]] = {  # in the order they run
    "tests": check_tests, "dit": check_dit, "streaming": check_streaming, "oom": check_oom,
    "attention": check_attention, "fp8": check_fp8, "compile": check_compile, "sampling": check_sampling}


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    failed_steps: list[str] = field(default_factory=list)


def run_steps(plan: Plan, names: list[str], deadline_s: float) -> Outcome:
    outcome, start = Outcome(), time.perf_counter()
    for name in names:
        if time.perf_counter() - start > deadline_s:
            outcome.rows.append(Row(name, "skipped", False, None, None, f"past the {deadline_s:.0f} s deadline"))
            outcome.failed_steps.append(name)
            continue
        manager = MemoryManager(MemoryOptions(compute_device=plan.device))
        previous = memory.set_manager(manager)
        step_start = time.perf_counter()
        try:
            rows = STEPS[name](plan)
        except Exception as error:  # one step's failure is recorded; the others still run
            summary = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
            where = traceback.extract_tb(error.__traceback__)[-1]
            rows = [Row(name, "error", False, time.perf_counter() - step_start, None,
                        f"{summary} ({Path(where.filename).name}:{where.lineno})")]
        finally:
            manager.close()
            memory.set_manager(previous)
            gc.collect()
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
        if not all(row.ok for row in rows):
            outcome.failed_steps.append(name)
        outcome.rows.extend(rows)
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: {'ok' if all(r.ok for r in rows) else 'FAILED'}",
              flush=True)
        for row in rows:  # as they come, so that a run cut short still shows them
            print(f"    {row.item}: {'ok' if row.ok else 'FAIL'}; {row.result}", flush=True)
    return outcome


def table(rows: list[Row]) -> str:
    header = ("step", "item", "status", "seconds", "peak GiB", "result")
    cells = [(r.step, r.item, "ok" if r.ok else "FAIL", "-" if r.seconds is None else f"{r.seconds:.2f}",
              "-" if r.peak_gib is None else f"{r.peak_gib:.1f}", r.result) for r in rows]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[5]]
    lines += ["  ".join(c[i].ljust(widths[i]) for i in range(5)) + "  " + c[5] for c in cells]
    return "\n".join(lines)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name}, {props.total_memory / GiB:.0f} GiB, compute capability {props.major}.{props.minor}, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__} (dry run: tiny sizes)"


def main() -> int:
    # Python put this script's folder first on the path, where benchmarks/gguf.py would shadow the gguf package
    # that diffusers imports; the repository root takes its place.
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    if len(sys.argv) > 1 and sys.argv[1] == "--pytest-child":
        return pytest_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    parser.add_argument("--only", default=",".join(STEPS), help=f"steps to run, comma-separated: {','.join(STEPS)}")
    parser.add_argument("--deadline", type=float, default=450.0, help="seconds after which steps are skipped")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    if args.dry_run:
        plan = dry_plan()
    elif not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run on a machine without a GPU")
    else:
        plan = real_plan(torch.device("cuda", torch.cuda.current_device()))
    print(f"device_check on {describe(plan.device)}; steps {', '.join(names)}", flush=True)
    outcome = run_steps(plan, names, args.deadline)
    text = table(outcome.rows)
    last = f"device_check: steps={len(names)} failed={len(outcome.failed_steps)} device={plan.device.type}"
    print(text)
    print(last, flush=True)
    if args.out is not None:
        args.out.write_text(f"{describe(plan.device)}\n{text}\n{last}\n")
    return 1 if outcome.failed_steps else 0


if __name__ == "__main__":
    sys.exit(main())
