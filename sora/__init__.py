"""sora: a Sora-style spacetime-patch video diffusion transformer (Wan 2.1 / 2.2 compatible) as a plain package.

Nothing here imports ComfyUI. Submodules load on first use (`sora.dit`, `sora.vae`, ...), so importing the
package is cheap and the ComfyUI nodes can reach every stage through one name.
"""
import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
