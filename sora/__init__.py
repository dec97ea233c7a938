"""sora: a Sora-style spacetime-patch video diffusion transformer (Wan 2.1 / 2.2 compatible) as a plain package.

Nothing here imports ComfyUI. Submodules load on first use (`sora.dit`, `sora.vae`, ...), so importing the
package is cheap and the ComfyUI nodes can reach every stage through one name.
"""
import importlib

__version__ = "0.1.0"


def lazy_submodules(package: str):
    """A module `__getattr__` for `package` that imports its submodule `name` on first use."""
    def __getattr__(name: str):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{package}.{name}":
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            raise
    return __getattr__


__getattr__ = lazy_submodules(__name__)
