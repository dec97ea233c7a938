"""The host the nodes run in: ComfyUI, or the headless `sora` command.

Node code calls these functions and stays the same in both places:

- model files by kind (`model_files`, `model_path`): ComfyUI's model folders through `folder_paths`, or
  `--models-dir DIR/<kind>/` headless; input files (`input_files`, `input_path`): ComfyUI's input folder, or
  anywhere headless; and which files a name may reach at all (`readable`, the rule below);
- where outputs go (`output_dir`, `save_path`): ComfyUI's output folder or `--output-dir`, with ComfyUI's
  counter naming (`prefix_00001_.mp4`) and never a path outside that folder;
- progress (`progress`): `comfy.utils.ProgressBar` with latent previews inside ComfyUI, tqdm on the terminal;
- cancelling (`check_interrupt`): ComfyUI's interrupt flag, or Ctrl-C once the CLI installed its handler.

Which files a name may reach. A ComfyUI server reads names from whoever can send it a graph (a shared studio
machine, `--listen 0.0.0.0`, a service that runs uploaded workflows), so inside ComfyUI a name resolves only inside
ComfyUI's own folders: input files in its input folder (core's annotated names, `clip.mp4 [input]`, `[output]`,
`[temp]`, subfolders allowed) and the pack's shipped `workflows/assets/`, model files in its model folders
(`folder_paths`, `extra_model_paths.yaml` included). Symlinks are followed: a name whose real file lies outside is
refused like an absolute path, `..`, `~`, a drive or a UNC path, with one message that is the same whether or not
the target exists. The server's owner may lift the rule for the whole server with the environment variable
`SORA_ALLOW_ANY_PATH=1`; no node input can. Headless (`sora run`) is run by the machine's own user, so any path is
allowed there.

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
from pathlib import Path

from .errors import InputError, Interrupted

MODEL_KINDS = ("diffusion_models", "text_encoders", "vae", "loras", "clip_vision", "LLM")
ALLOW_ANY_PATH = "SORA_ALLOW_ANY_PATH"  # set to 1 by a server's owner: names may reach any file
ASSETS = Path(__file__).resolve().parent.parent / "workflows" / "assets"  # the shipped workflows' input files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v")
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
        root = _headless_dir("models_dir")
        return [root / kind] + ([root / "unet"] if kind == "diffusion_models" else [])
    import folder_paths
    if kind in folder_paths.folder_names_and_paths:
        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    # ComfyUI core registers no "LLM" folder; models/LLM is where language-model packs keep theirs.
    return [Path(folder_paths.models_dir) / kind]


def _all_model_folders() -> list[Path]:
    """Every model folder ComfyUI knows (the roots a loader's `path` input may reach inside it)."""
    import folder_paths
    folders = [Path(folder_paths.models_dir)]
    for paths, _ in folder_paths.folder_names_and_paths.values():
        folders += [Path(p) for p in paths]
    return folders


def _is_model_entry(path: Path) -> bool:
    # Imported here, not at the top: checkpoints imports torch, which `sora --help` and validation do not need.
    from .checkpoints import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
    return path.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (GGUF_SUFFIX,) \
        or path.name.endswith(SHARD_INDEX_SUFFIX)


def _scan(folder: Path, wanted=_is_model_entry) -> list[str]:
    """Entries under `folder` as relative posix paths, only those a name may reach (`readable`); a model folder
    (Hugging Face layout, with config.json) is one entry, not its files."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        if here != folder and HF_CONFIG in filenames:
            names.append(here.relative_to(folder).as_posix())
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names += [(here / f).relative_to(folder).as_posix() for f in filenames if wanted(here / f)]
    return names if any_path_allowed() else [name for name in names if _inside(folder / name, [folder])]


def model_files(kind: str) -> list[str]:
    """Names of the models of `kind` (for a node's file dropdown), sorted, without duplicates."""
    names = set()
    for folder in model_folders(kind):
        if folder.is_dir():
            names.update(_scan(folder))
    return sorted(names)


def model_path(kind: str, name: str, *, typed: bool = False) -> Path:
    """The file or model folder `name` (as listed by `model_files`, or a path `readable` allows) refers to.
    typed: the name was typed as a path (a loader's `path` input); headless, a relative one then starts from the
    current directory, as paths on a command line do."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"no {kind} model chosen; pick a file from the list or give a path")
    folders = model_folders(kind)
    if typed and not in_comfyui():
        folders = [Path.cwd(), *folders]
    inside = _all_model_folders() if in_comfyui() else folders
    path = readable(name, folders, what=f"{kind} model", roots=inside, where="ComfyUI's model folders")
    if path is not None:
        return path
    if Path(name.strip()).expanduser().is_absolute():
        raise InputError(f"{kind} model {name!r}: no such file or folder; check the path")
    available = model_files(kind)
    listed = ", ".join(available[:10]) + (f", ... ({len(available)} in all)" if len(available) > 10 else "")
    where = ", ".join(str(f) for f in folders)
    hint = "" if in_comfyui() else f", pass --models-dir DIR (models go in DIR/{kind}/)"
    raise InputError(f"{kind} model {name!r} not found; looked in {where} (available: {listed or 'none'}). "
                     f"Put the file there{hint} or give its path")


# ---------------------------------------------------------------------------------------------------------------
# Input files and the rule of what a name may reach
# ---------------------------------------------------------------------------------------------------------------

def any_path_allowed() -> bool:
    """Whether names may reach any file: always headless, inside ComfyUI only when the owner set
    SORA_ALLOW_ANY_PATH=1."""
    return not in_comfyui() or os.environ.get(ALLOW_ANY_PATH, "").strip().lower() in ("1", "true", "yes")


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _inside(path: Path, roots: list[Path]) -> bool:
    """`path`, symlinks followed, lies in one of `roots` (symlinks followed too)."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root) for root in roots)


def readable(name: str, folders: list[Path], *, what: str, roots: list[Path] | None = None,
             where: str = "ComfyUI's folders") -> Path | None:
    """The existing file or folder `name` refers to: an absolute path, or a name looked up in `folders` in order;
    None when there is none. The rule of the module docstring: unless `any_path_allowed()`, a name that leads
    outside `roots` (default: `folders`) raises InputError, the same whether or not the target exists.

    what: what the name is ("image", "vae model"), for the message; where: the roots in words.
    """
    text = name.strip().replace("\\", "/")  # both separators count on every platform
    free = any_path_allowed()
    if free:
        given = Path(text).expanduser()
    elif "\0" in text or text.startswith(("~", "//")) or _WINDOWS_DRIVE.match(text) or ".." in text.split("/"):
        raise _refused(what, name, where)  # from home, a UNC share, a drive, climbing up: refused on sight
    else:
        given = Path(text)
    candidates = [given] if given.is_absolute() else [folder / text for folder in folders]
    if not free and not all(_inside(c, roots or folders) for c in candidates):
        raise _refused(what, name, where)  # decided before looking whether it exists
    return next((c for c in candidates if c.exists()), None)


def _refused(what: str, name: str, where: str) -> InputError:
    return InputError(f"{what} {name!r} is outside {where}, which is all a ComfyUI client may make the server read; "
                      f"put the file there (the server's owner can allow any path with {ALLOW_ANY_PATH}=1)")


def _input_folders() -> tuple[list[Path], str]:
    """Where input files (images, videos) are looked for, and the same in words."""
    if not in_comfyui():
        return [Path.cwd(), ASSETS], "the current directory and the pack's workflows/assets"
    import folder_paths
    return [Path(folder_paths.get_input_directory()), ASSETS], "ComfyUI's input folder and the pack's workflows/assets"


def input_files(suffixes: tuple[str, ...]) -> list[str]:
    """Input files with one of `suffixes` (for a load node's list inside ComfyUI): ComfyUI's input folder, with
    subfolders, and the shipped assets; sorted, without duplicates."""
    names = set()
    for folder in _input_folders()[0]:
        if folder.is_dir():
            names.update(_scan(folder, lambda p: p.suffix.lower() in suffixes))
    return sorted(names)


_ANNOTATION = re.compile(r"^(.*?)\s*\[(input|output|temp)\]$")


def input_path(name: str, what: str = "input file") -> Path:
    """The input file `name` refers to (an annotated name like ComfyUI core's `clip.mp4 [input]` reads that
    folder), under the rule of the module docstring."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"no {what} given; pick a file from the list or give its name")
    folders, where = _input_folders()
    annotated = _ANNOTATION.match(name.strip())
    if annotated and in_comfyui():
        import folder_paths
        folder = {"input": folder_paths.get_input_directory, "output": folder_paths.get_output_directory,
                  "temp": folder_paths.get_temp_directory}[annotated[2]]()
        name, folders = annotated[1], [Path(folder)]
        where = f"ComfyUI's {annotated[2]} folder"
    path = readable(name, folders, what=what, where=where)
    if path is None or not path.is_file():
        looked = ", ".join(str(f) for f in folders) if any_path_allowed() else where
        raise InputError(f"{what} {name!r} was not found (looked in {looked}); upload it or give an existing file")
    return path


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


def split_prefix(prefix: str) -> tuple[list[str], str]:
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
    subfolders, stem = split_prefix(filename_prefix)
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
