"""Shared test fixtures: the repository imported the way ComfyUI imports a custom node folder, and the test device.

Tests that take the `device` fixture are the device-dependent ones (marked `device` at collection): they run on the
CPU by default and on a GPU with `pytest --device cuda` (or `SORA_TEST_DEVICE=cuda`); `pytest -m device --device
cuda` runs only them, as `benchmarks/device_check.py` does.
"""
import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("SORA_TEST_DEVICE", "cpu"),
                     help="torch device of the device-dependent tests (the `device` fixture): cpu (default), cuda, "
                          "cuda:1, ...; the environment variable SORA_TEST_DEVICE sets the default")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: takes the test device (--device / SORA_TEST_DEVICE); added to every "
                                       "test that uses the `device` fixture")
    try:
        device = torch.device(config.getoption("--device"))
    except RuntimeError as e:
        raise pytest.UsageError(f"--device / SORA_TEST_DEVICE: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device} (or SORA_TEST_DEVICE) asks for CUDA, but torch "
                                f"{torch.__version__} sees no CUDA device here; use --device cpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device of the device-dependent tests: the CPU unless --device / SORA_TEST_DEVICE says otherwise."""
    return torch.device(pytestconfig.getoption("--device"))


def import_as_custom_node(name: str):
    """Import the repository folder as a package called `name`, as ComfyUI's custom node loader does."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def custom_node_package():
    """The pack imported under a fresh, arbitrary package name (removed again afterwards)."""
    name = f"pack_{uuid.uuid4().hex[:8]}"
    module = import_as_custom_node(name)
    yield module
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder (ComfyUI layout) holding the tiny random stand-ins of every supported file."""
    from sora import standins

    root = tmp_path_factory.mktemp("models")
    standins.write_standins(root)
    return root


@pytest.fixture(scope="module")
def fresh_manager():
    """A memory manager and a model cache of the test module's own."""
    from sora import memory, model_cache

    previous = memory.set_manager(memory.MemoryManager())
    previous_cache, model_cache._cache = model_cache._cache, model_cache.ModelCache()
    yield
    memory.set_manager(previous) if previous is not None else None
    model_cache._cache = previous_cache
