"""Run first in every worker process that `sora.parallel_launch` starts inside ComfyUI, before anything is
unpickled (multiprocessing's spawn runs the parent's main script first; the launcher names this file instead).

ComfyUI imports a custom node pack under its folder's path as the module name (`/.../custom_nodes/<pack>`), which
a fresh process cannot import, so the pickled worker code (`<pack>.sora.parallel_launch`) would not load. Here the
pack is registered under that name as a package whose submodules import from its folder; its `__init__` (which
loads every node module) is not run. Plain Python on purpose: nothing of the pack is imported yet.
"""
import importlib.machinery
import importlib.util
import os
import sys

_name, _folder = os.environ.get("SORA_PACK_MODULE"), os.environ.get("SORA_PACK_FOLDER")
if _name and _folder and _name not in sys.modules:
    _spec = importlib.machinery.ModuleSpec(_name, None, is_package=True)
    _spec.submodule_search_locations = [_folder]
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
