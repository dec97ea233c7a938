"""Shared test fixtures: the repository imported the way ComfyUI imports a custom node folder."""
import importlib.util
import sys
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
