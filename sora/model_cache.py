"""The model cache: loaders' results handed back on later runs for the same file and options.

`load(loader, path, **options)` returns what `loader(path, **options)` returned before, while the file is unchanged
(same size and modification time), so repeated runs of a graph reuse the same objects instead of reading the file
again and growing memory. Torch modules that come back are registered with the memory manager, which places them;
the cache only decides what stays in host memory. It forgets its least recently used objects when they hold more
than `max_bytes` (the one just loaded always stays). One cache per process (`get_cache()`).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from . import memory
from .errors import InputError
from .streaming import module_bytes

T = TypeVar("T")


class ModelCache:
    """Least-recently-used store of loaded models, keyed by loader, resolved path and options.

    max_bytes: host memory the cached objects may hold; None: half the physical memory where the system reports
        it, else no limit.
    """

    def __init__(self, max_bytes: int | None = None):
        memory.check_bytes("max_bytes", max_bytes)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()  # key -> (file identity, object)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, loader: Callable[..., T], path: str | Path, **options) -> T:
        """`loader(path, **options)`, or the object it returned before for the same file and options."""
        path = Path(path)
        if not path.exists():
            return loader(path, **options)  # the loader's own error says what is missing
        key = (f"{loader.__module__}.{loader.__qualname__}", str(path.resolve()), tuple(sorted(options.items())))
        try:
            hash(key)
        except TypeError:
            raise InputError(f"loader options must be plain values (numbers, strings, dtypes); got {options}") from None
        identity = file_identity(path)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == identity:
            self._entries.move_to_end(key)
            loaded = cached[1]
        else:
            self._entries.pop(key, None)  # a changed file: drop the old object before loading the new one
            loaded = loader(path, **options)  # an error leaves nothing behind in the cache
            self._entries[key] = (identity, loaded)
            self._trim()
        if isinstance(loaded, nn.Module):
            memory.get_manager().register(loaded, name=path.name)
        return loaded

    def clear(self) -> None:
        """Forget every cached model (they are freed once nothing else holds them)."""
        self._entries.clear()

    def _limit(self) -> int | None:
        if self.max_bytes is not None:
            return self.max_bytes
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
            return None

    def _trim(self) -> None:
        limit = self._limit()
        while limit is not None and len(self._entries) > 1 and \
                sum(host_bytes(obj) for _, obj in self._entries.values()) > limit:
            self._entries.popitem(last=False)


def file_identity(path: Path) -> tuple:
    """(name, size, modification time) of a file, or of every file in a folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])


def host_bytes(obj) -> int:
    """Weight bytes of a cached object: a module, or the modules among an object's attributes (a text encoder)."""
    if isinstance(obj, nn.Module):
        return module_bytes(obj)
    return sum(module_bytes(v) for v in getattr(obj, "__dict__", {}).values() if isinstance(v, nn.Module))


_cache: ModelCache | None = None


def get_cache() -> ModelCache:
    """The cache shared by the whole process (tests swap `_cache` for one of their own)."""
    global _cache
    if _cache is None:
        _cache = ModelCache()
    return _cache


def load(loader: Callable[..., T], path: str | Path, **options) -> T:
    """`get_cache().load(loader, path, **options)`."""
    return get_cache().load(loader, path, **options)
