"""The model package, found relative to wherever this folder was imported from.

ComfyUI imports the repository folder as a package named after the folder, so the model package is the sibling
`<pack>.sora`. `pip install` ships this folder as the subpackage `sora.nodes`, so there it is the parent.
Node modules write `from ._sora import sora` and then use `sora.dit`, `sora.vae`, ... (loaded on first use).
"""
import importlib

_parent = __package__.rpartition(".")[0]
sora = importlib.import_module(_parent if __package__ == "sora.nodes" else f"{_parent}.sora")
