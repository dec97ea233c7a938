"""The host the nodes run in: ComfyUI, or the headless `sora` command.

Node code calls these functions and stays the same in both places:

- model files by kind (`model_files`, `model_path`): ComfyUI's model folders through `folder_paths`, or
  `--models-dir DIR/<kind>/` headless; a name may also be an absolute path;
- where outputs go (`output_dir`, `save_path`): ComfyUI's output folder or `--output-dir`, with ComfyUI's
  counter naming (`prefix_00001_.mp4`) and never a path outside that folder;
- progress (`progress`): `comfy.utils.ProgressBar` with latent previews inside ComfyUI, tqdm on the terminal;
- cancelling (`check_interrupt`): ComfyUI's interrupt flag, or Ctrl-C once the CLI installed its handler.

"Inside ComfyUI" means ComfyUI's `folder_paths` module is already imported. ComfyUI modules are imported inside
the functions that need them, never at module level, so `sora` imports anywhere.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InputError, Interrupted

MODEL_KINDS = ("diffusion_models", "text_encoders", "vae", "LLM")
# What a model folder lists: weight files, shard indexes, GGUF files (the prompt-expansion LLM) and model
# folders in the Hugging Face layout (a directory with config.json, listed as one entry).
GGUF_SUFFIX = ".gguf"
SHARD_INDEX_SUFFIX = ".safetensors.index.json"
HF_CONFIG = "config.json"

COUNTER_DIGITS = 5  # ComfyUI's save nodes name files f"{prefix}_{counter:05}_.{ext}"


def in_comfyui() -> bool:
    """True when running inside ComfyUI (its `folder_paths` module is loaded)."""
    return "folder_paths" in sys.modules


# ---------------------------------------------------------------------------------------------------------------
# Settings of the headless host
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Environment:
    """Where things are. Inside ComfyUI, `output_dir` is ComfyUI's and `models_dir` is None (folder_paths)."""
    inside_comfyui: bool
    output_dir: Path
    models_dir: Path | None


# Headless folders; unset ones default to ./output and ./models, as ComfyUI's sit in its install folder.
_headless: dict[str, Path | None] = {"output_dir": None, "models_dir": None}


def _headless_dir(key: str) -> Path:
    return _headless[key] or Path(key.removesuffix("_dir")).absolute()


def configure(*, output_dir: str | Path | None = None, models_dir: str | Path | None = None) -> Environment:
    """Set the headless output and model folders (the CLI's `--output-dir`, `--models-dir`); None keeps one.

    Nothing is created here: the output folder appears when the first file is saved. Inside ComfyUI these
    settings are not used; ComfyUI's own folders apply.
    """
    if output_dir is not None:
        _headless["output_dir"] = Path(output_dir).expanduser().absolute()
    if models_dir is not None:
        _headless["models_dir"] = Path(models_dir).expanduser().absolute()
    return current()


def current() -> Environment:
    """The host as it is now."""
    if in_comfyui():
        return Environment(inside_comfyui=True, output_dir=output_dir(), models_dir=None)
    return Environment(inside_comfyui=False, output_dir=_headless_dir("output_dir"),
                       models_dir=_headless_dir("models_dir"))


# ---------------------------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------------------------

def model_folders(kind: str) -> list[Path]:
    """The folders searched for models of `kind`, in search order."""
    if kind not in MODEL_KINDS:
        raise InputError(f"unknown model kind {kind!r}; use one of {MODEL_KINDS}")
    if not in_comfyui():
        return [_headless_dir("models_dir") / kind]
    import folder_paths
    if kind in folder_paths.folder_names_and_paths:
        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    # ComfyUI core registers no "LLM" folder; models/LLM is where language-model packs keep theirs.
    return [Path(folder_paths.models_dir) / kind]


def _is_model_entry(path: Path) -> bool:
    # Imported here, not at the top: checkpoints imports torch, which `sora --help` and validation do not need.
    from .checkpoints import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
    return path.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (GGUF_SUFFIX,) \
        or path.name.endswith(SHARD_INDEX_SUFFIX)


def _scan(folder: Path) -> list[str]:
    """Model names under `folder` as relative posix paths; a model folder is one entry, not its files."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        if here != folder and HF_CONFIG in filenames:
            names.append(here.relative_to(folder).as_posix())
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names += [(here / f).relative_to(folder).as_posix() for f in filenames if _is_model_entry(here / f)]
    return names


def model_files(kind: str) -> list[str]:
    """Names of the models of `kind` (for a node's file dropdown), sorted, without duplicates."""
    names = set()
    for folder in model_folders(kind):
        if folder.is_dir():
            names.update(_scan(folder))
    return sorted(names)


def model_path(kind: str, name: str) -> Path:
    """The file or model folder `name` (as listed by `model_files`, or an absolute path) refers to."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"no {kind} model chosen; pick a file from the list or give an absolute path")
    given = Path(name).expanduser()
    if given.is_absolute():
        if given.exists():
            return given
        raise InputError(f"{kind} model {name!r}: no such file or folder; check the path")
    folders = model_folders(kind)
    relative = PurePosixPath(name.replace("\\", "/"))
    if ".." in relative.parts:
        raise InputError(f"{kind} model {name!r} must not contain '..'; give a name from the list or an "
                         "absolute path")
    for folder in folders:
        candidate = folder / relative
        if candidate.exists():
            return candidate
    available = model_files(kind)
    listed = ", ".join(available[:10]) + (f", ... ({len(available)} in all)" if len(available) > 10 else "")
    where = ", ".join(str(f) for f in folders)
    hint = "" if in_comfyui() else f", pass --models-dir DIR (models go in DIR/{kind}/)"
    raise InputError(f"{kind} model {name!r} not found; looked in {where} (available: {listed or 'none'}). "
                     f"Put the file there{hint} or give an absolute path")


# ---------------------------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------------------------

def output_dir() -> Path:
    """The folder outputs are saved under (it may not exist yet)."""
    if in_comfyui():
        import folder_paths
        return Path(folder_paths.get_output_directory()).absolute()
    return _headless_dir("output_dir")


@dataclass(frozen=True)
class SavePath:
    """A free file name under the output folder, and how ComfyUI's UI refers to it."""
    path: Path
    filename: str
    subfolder: str  # posix, relative to the output folder; "" for the folder itself

    def ui(self) -> dict:
        """The entry a save node lists in its "ui" result ({"filename", "subfolder", "type": "output"})."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": "output"}


_DRIVE = re.compile(r"^[A-Za-z]:")


def _split_prefix(prefix: str) -> tuple[list[str], str]:
    """(subfolders, file stem) of a filename prefix; refuses anything that could leave the output folder."""
    if not isinstance(prefix, str) or "\0" in prefix:
        raise InputError(f"filename_prefix must be text without NUL characters, got {prefix!r}")
    # Both separators count on every platform, so a prefix written on Windows means the same everywhere.
    text = prefix.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        raise InputError(f"filename_prefix {prefix!r} is an absolute path; outputs always go under the output "
                         "folder: give a relative name such as 'sora/clip'")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InputError(f"filename_prefix {prefix!r} contains '..'; outputs always go under the output folder: "
                         "give a relative name such as 'sora/clip'")
    if not parts or text.endswith("/"):
        raise InputError(f"filename_prefix {prefix!r} has no file name; give one such as 'sora/clip'")
    if any(_DRIVE.match(p) for p in parts):
        raise InputError(f"filename_prefix {prefix!r} contains a drive letter; give a relative name")
    return parts[:-1], parts[-1]


def _next_counter(folder: Path, stem: str) -> int:
    """1 + the largest counter of `{stem}_{NNNNN}_.*` files in `folder` (1 when there are none)."""
    pattern = re.compile(re.escape(stem) + r"_(\d+)_\.", re.IGNORECASE)
    counters = [int(m.group(1)) for entry in os.listdir(folder) if (m := pattern.match(entry))]
    return max(counters, default=0) + 1


def save_path(filename_prefix: str, extension: str) -> SavePath:
    """A new file `<output>/<subfolders>/<name>_<NNNNN>_.<extension>` for the prefix `<subfolders>/<name>`.

    The counter continues from the files already there, as ComfyUI's save nodes do. Subfolders are created;
    nothing else is written. Raises InputError for a prefix that would leave the output folder (`..`, absolute
    paths, drive letters), also through a symlinked subfolder.
    """
    if not re.fullmatch(r"[A-Za-z0-9]+", extension.lstrip(".")):
        raise InputError(f"file extension {extension!r} must be letters and digits, e.g. 'mp4'")
    extension = extension.lstrip(".")
    subfolders, stem = _split_prefix(filename_prefix)
    root = output_dir()
    folder = root.joinpath(*subfolders)
    if not folder.resolve().is_relative_to(root.resolve()):  # a symlink inside the output folder points out
        raise InputError(f"filename_prefix {filename_prefix!r} leads outside the output folder {root}")
    folder.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(folder, stem)
    while True:  # a file a previous run left with a higher counter and another extension is still skipped
        filename = f"{stem}_{counter:0{COUNTER_DIGITS}}_.{extension}"
        if not os.path.lexists(folder / filename):  # a dangling symlink counts as taken: never write through it
            return SavePath(folder / filename, filename, "/".join(subfolders))
        counter += 1


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------

class _ComfyProgress:
    """ComfyUI's progress bar on the running node, with an optional preview image per update."""

    def __init__(self, total: int):
        import comfy.utils
        self.total = total
        self.value = 0
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, n: int = 1, preview=None) -> None:
        self.value = min(self.value + n, self.total)
        if preview is None:
            self.bar.update_absolute(self.value, self.total)
        else:
            from comfy.cli_args import args
            self.bar.update_absolute(self.value, self.total, ("JPEG", preview, args.preview_size))

    def close(self) -> None:
        pass


class _TerminalProgress:
    """A tqdm bar on stderr; previews cannot be shown there and are ignored."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, preview=None) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class Progress:
    """Progress of one long step (sampling, decoding). Use as a context manager or call `close()`."""

    def __init__(self, total: int, desc: str = ""):
        self._impl = _ComfyProgress(total) if in_comfyui() else _TerminalProgress(total, desc)

    def update(self, n: int = 1, preview=None) -> None:
        """Advance by `n`; `preview` is an optional PIL image (a latent preview) shown in ComfyUI."""
        self._impl.update(n, preview)

    def close(self) -> None:
        self._impl.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str = "") -> Progress:
    """A progress bar for `total` steps, ComfyUI's or the terminal's."""
    return Progress(total, desc)


def wants_previews() -> bool:
    """Whether latent previews would be shown (ComfyUI with a preview method other than "none")."""
    if not in_comfyui():
        return False
    from comfy.cli_args import LatentPreviewMethod, args
    return args.preview_method != LatentPreviewMethod.NoPreviews


# ---------------------------------------------------------------------------------------------------------------
# Interrupt
# ---------------------------------------------------------------------------------------------------------------

_interrupt_requested = threading.Event()


@functools.cache
def _comfy_interrupted_type() -> type:
    """Interrupted that is also ComfyUI's InterruptProcessingException, so ComfyUI reports a cancel, not an error."""
    import comfy.model_management
    return type("Interrupted", (Interrupted, comfy.model_management.InterruptProcessingException), {})


def check_interrupt() -> None:
    """Raise Interrupted if the user asked to stop (ComfyUI's cancel button, Ctrl-C in the CLI). Clears the request."""
    if in_comfyui():
        import comfy.model_management
        if comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(False)
            raise _comfy_interrupted_type()("cancelled in ComfyUI")
        return
    if _interrupt_requested.is_set():
        _interrupt_requested.clear()
        raise Interrupted("stopped by Ctrl-C")


def request_interrupt() -> None:
    """Ask the running job to stop at its next `check_interrupt()` (headless)."""
    _interrupt_requested.set()


def _on_sigint(signum, frame) -> None:
    request_interrupt()
    # A second Ctrl-C must still stop a step that never checks, so the default handler comes back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("\nstopping after the current step (Ctrl-C again to abort at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def ctrl_c_interrupts():
    """For the CLI (main thread): while active, the first Ctrl-C requests a stop between steps."""
    _interrupt_requested.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupt_requested.clear()
