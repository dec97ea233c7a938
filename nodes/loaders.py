"""Loaders for the diffusion transformer, the text encoder and the VAE.

Files come from ComfyUI's model folders (`diffusion_models`, `text_encoders`, `vae`) inside ComfyUI and from
`--models-dir DIR/<folder>/` headless (both through `sora.runtime`); the optional `path` input takes any file
instead. The embedded models ("nano (embedded)", "minilm (embedded)") need no file and are the defaults. Loaded
models are kept by the model cache (`sora.model_cache`): the same file with the same options gives the same object
on the next run, so repeated runs neither reload nor grow memory.
"""
from __future__ import annotations

from pathlib import Path

from ._common import about, category, mappings
from ._handles import DIT, TEXT_ENCODER, VAE, expert_from_name
from ._sora import sora

NANO = "nano (embedded)"
MINILM = "minilm (embedded)"
AUTO_EXPERT = "auto (from the file name)"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8_e4m3fn": "float8_e4m3fn",
          "fp8_e5m2": "float8_e5m2"}  # option -> torch dtype name

PATH_TOOLTIP = ("A model file or folder to load instead of the list entry: a path (inside ComfyUI, only within its "
                "model folders). Leave empty to use the list.")


def _dtype(option: str):
    """The torch dtype for a dtype option ("default" / "auto" -> None)."""
    import torch
    return getattr(torch, DTYPES[option]) if option in DTYPES else None


def _compute_dtype(option: str):
    """"auto": bfloat16 on an accelerator (the reference precision), float32 on the CPU (fast there)."""
    import torch
    if option != "auto":
        return _dtype(option)
    return torch.bfloat16 if sora.memory.get_manager().compute_device.type != "cpu" else torch.float32


def _choices(embedded: str | None, kind: str) -> list[str]:
    return ([embedded] if embedded else []) + sora.runtime.model_files(kind)


def _source(node: type, kind: str, input_name: str, name: str, path: str, embedded: str, embedded_file) -> Path:
    """The file or folder to load: the `path` input when given, else the list entry `name` of the input
    `input_name`, where the entry `embedded` means `embedded_file()`."""
    if path.strip():
        with about(node, "path"):
            return sora.runtime.model_path(kind, path.strip(), typed=True)
    with about(node, input_name):
        return embedded_file() if name == embedded else sora.runtime.model_path(kind, name)


INPUT_NAMES = {"diffusion_models": "model_name", "text_encoders": "text_encoder_name", "vae": "vae_name",
               "loras": "lora_name", "clip_vision": "clip_name"}  # the list input of each kind's loader


def validate_file(kind: str, name, path, embedded: str | None) -> bool | str:
    """VALIDATE_INPUTS of a loader: the file its inputs name must be one a name may reach (`sora.runtime`'s rule),
    so a refused or missing file fails before the graph runs."""
    typed = isinstance(path, str) and bool(path.strip())
    try:
        if typed:
            sora.runtime.model_path(kind, path.strip(), typed=True)
        elif isinstance(name, str) and name != embedded:
            sora.runtime.model_path(kind, name)
    except sora.errors.InputError as e:
        return f"input '{'path' if typed else INPUT_NAMES[kind]}': {e}"
    return True


def _chosen(input_name: str, path: str) -> str:
    """The input that chose the file, for error messages."""
    return "path" if path.strip() else input_name


class SoraModelLoader:
    DISPLAY_NAME = "Sora Load Diffusion Model"
    DESCRIPTION = ("Loads a Wan 2.1 / 2.2 video diffusion transformer (any layout: original, ComfyUI, diffusers; "
                   "bf16, fp16, fp8 or scaled fp8), or the embedded nano model. The shape is read from the file.")
    CATEGORY = category("loaders")
    FUNCTION = "load"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (_choices(NANO, "diffusion_models"), {
                    "default": NANO,
                    "tooltip": "A file in the diffusion_models folder, or the embedded nano model (no file needed)."}),
                "weight_dtype": (["default", "bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"], {
                    "default": "default",
                    "tooltip": "How the weights are stored in memory. default: as in the file (fp8 files stay fp8). "
                               "fp8 halves the memory of a 16-bit file at some cost in quality. fp8_e4m3fn_fast: "
                               "fp8 with a per-layer scale, multiplied in fp8 on GPUs that can (RTX 40xx, L4, H100 "
                               "and later), faster at a little more cost in quality; upcast like fp8 elsewhere."}),
                "compute_dtype": (["auto", "bf16", "fp16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Precision of the matrix products. auto: bf16 on a GPU (the reference), fp32 on the "
                               "CPU."}),
                "attention": (list(sora.attention.BACKENDS), {
                    "default": "sdpa",
                    "tooltip": "Attention kernel. sdpa works everywhere; matmul is faster for bf16 on the CPU "
                               "(plain matrix products in chunks; float32 runs sdpa); flash_attn and sageattn need "
                               "their package and a CUDA GPU."}),
                "expert": ([AUTO_EXPERT, *sora.handle.EXPERTS], {
                    "default": AUTO_EXPERT,
                    "tooltip": "Wan 2.2 A14B ships two experts with identical tensors: 'high noise' runs the early "
                               "steps, 'low noise' the late ones. auto reads it from the file name (high_noise / "
                               "low_noise); set it by hand for renamed files."}),
            },
            "optional": {"path": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name, path=""):
        return validate_file("diffusion_models", model_name, path, NANO)

    def load(self, model_name, weight_dtype, compute_dtype, attention, expert, path=""):
        file = _source(type(self), "diffusion_models", "model_name", model_name, path, NANO, sora.nano.dit_path)
        with about(type(self), _chosen("model_name", path)):
            stored = sora.ops.FP8_E4M3FN_FAST if weight_dtype == "fp8_e4m3fn_fast" else _dtype(weight_dtype)
            dit = sora.model_cache.load(sora.dit.load_dit, file, weight_dtype=stored,
                                        compute_dtype=_compute_dtype(compute_dtype), attention=attention)
        handle = sora.handle
        role = expert_from_name(str(file)) if expert == AUTO_EXPERT else expert
        if role != handle.SINGLE and dit.config.model_type not in ("t2v", "i2v"):
            raise sora.errors.InputError(
                f"{self.DISPLAY_NAME}: input 'expert' = {role!r}, but {file.name} is a {dit.config.model_type} "
                f"model, which is one model, not a {handle.HIGH_NOISE} / {handle.LOW_NOISE} expert; choose "
                f"'{handle.SINGLE}'")
        name = NANO if model_name == NANO and not path.strip() else file.name
        return (handle.ModelHandle(dit, name, role),)


class SoraTextEncoderLoader:
    DISPLAY_NAME = "Sora Load Text Encoder"
    DESCRIPTION = ("Loads umT5-XXL for Wan models (ComfyUI's umt5_xxl_*.safetensors embed their tokenizer; fp8 and "
                   "scaled fp8 work) or the embedded MiniLM encoder of the nano model.")
    CATEGORY = category("loaders")
    FUNCTION = "load"
    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (_choices(MINILM, "text_encoders"), {
                    "default": MINILM,
                    "tooltip": "A umT5 file in the text_encoders folder (for Wan), or the embedded MiniLM encoder "
                               "(for the nano model; no file needed)."}),
                "weight_dtype": (["default", "bf16", "fp16", "fp8_e4m3fn"], {
                    "default": "default",
                    "tooltip": "How umT5's weights are stored in memory; default keeps the file's. Ignored for "
                               "MiniLM."}),
                "compute_dtype": (["auto", "bf16", "fp16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Precision of umT5's matrix products; auto: bf16 on a GPU, fp32 on the CPU. Ignored "
                               "for MiniLM (always fp32)."}),
            },
            "optional": {"path": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, text_encoder_name, path=""):
        return validate_file("text_encoders", text_encoder_name, path, MINILM)

    def load(self, text_encoder_name, weight_dtype, compute_dtype, path=""):
        file = _source(type(self), "text_encoders", "text_encoder_name", text_encoder_name, path, MINILM,
                       sora.text.minilm_folder)
        with about(type(self), _chosen("text_encoder_name", path)):
            if text_encoder_name == MINILM and not path.strip():
                return (sora.model_cache.load(_load_minilm, file),)
            return (sora.model_cache.load(sora.text.load_text_encoder, file, dtype=_compute_dtype(compute_dtype),
                                          weight_dtype=_dtype(weight_dtype)),)


def _load_minilm(folder: Path):
    """`sora.text.load_minilm` in the form the model cache calls (the folder identifies the weights), with the
    nano DiT's window: a longer prompt is cut at the text encode, not refused by the sampler."""
    return sora.text.load_minilm(max_length=sora.nano.TEXT_TOKENS)


class SoraVAELoader:
    DISPLAY_NAME = "Sora Load VAE"
    DESCRIPTION = ("Loads a Wan 2.1 or 2.2 video VAE (wan_2.1_vae / wan2.2_vae, Wan2.x_VAE.pth or diffusers "
                   "layout), or the embedded nano VAE. Use the VAE that belongs to the diffusion model.")
    CATEGORY = category("loaders")
    FUNCTION = "load"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (_choices(NANO, "vae"), {
                    "default": NANO,
                    "tooltip": "A file in the vae folder (wan_2.1_vae for Wan 2.1 and 2.2 A14B, wan2.2_vae for "
                               "TI2V-5B), or the embedded nano VAE (no file needed)."}),
                "dtype": (["auto", "bf16", "fp16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Precision of the VAE. auto: as stored on a GPU, fp32 on the CPU (16-bit "
                               "convolutions are slow there)."}),
            },
            "optional": {"path": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name, path=""):
        return validate_file("vae", vae_name, path, NANO)

    def load(self, vae_name, dtype, path=""):
        file = _source(type(self), "vae", "vae_name", vae_name, path, NANO, sora.nano.vae_path)
        if dtype == "auto":
            torch_dtype = _dtype("fp32") if sora.memory.get_manager().compute_device.type == "cpu" else None
        else:
            torch_dtype = _dtype(dtype)
        with about(type(self), _chosen("vae_name", path)):
            return (sora.model_cache.load(sora.vae.load_vae, file, dtype=torch_dtype),)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraModelLoader, SoraTextEncoderLoader, SoraVAELoader)
