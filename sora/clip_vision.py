"""The CLIP vision encoder (ViT-H/14) that Wan 2.1 I2V / FLF2V reads the start (and end) image with.

Architecture facts (Wan2.1 wan/modules/clip.py, ComfyUI comfy/clip_model.py, transformers CLIPVisionTransformer):
a pre-norm ViT; a bias-free patch Conv2d, a learned class token and position table, LayerNorm before the encoder
(`pre_layrnorm`), encoder layers x + attn(ln1(x)), x + mlp(ln2(x)) with exact-erf GELU for ViT-H, and
`post_layernorm` applied only to the pooled class token, which `visual_projection` maps to `image_embeds`.

Wan conditions on the **penultimate** layer: the output after 31 of the 32 encoder layers, without post_layernorm
(Wan `use_31_block=True`, ComfyUI `penultimate_hidden_states`, transformers `hidden_states[-2]`), [B, 257, 1280].

Module attributes carry the Hugging Face transformers names (`vision_model.encoder.layers.N.self_attn.q_proj`, ...),
which is how ComfyUI's `clip_vision_h.safetensors` is named; open_clip (`visual.transformer.resblocks.N.*`) and
Wan's own `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (`visual.transformer.N.*`) are converted on
load. Linear layers are `ops.Linear`: weights stay in the file's dtype and are upcast per call.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import memory, ops
from .attention import attention, check_backend
from .checkpoints import StateDict, build, describe, load_state_dict
from .errors import CheckpointError, InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("gelu", "quick_gelu")
CROPS = ("center", "none")

# Released CLIP towers by width -> heads (head size 64, except ViT-H/14 at 80 and ViT-bigG/14 at 104); heads are
# not stored in files. Other widths fall back to head size 64.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}
# The OpenAI ViT-L/14 (ComfyUI clip_vision_config_vitl.json) uses quick_gelu; the LAION ViT-H and bigG use gelu.
_ACTIVATION_BY_WIDTH = {1024: "quick_gelu"}


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Encoder shape; the defaults are ViT-H/14 at 224 px as Wan and `clip_vision_h.safetensors` have it."""
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    eps: float = 1e-5
    activation: str = "gelu"  # exact erf GELU; "quick_gelu" is x·sigmoid(1.702x) (OpenAI CLIPs)
    projection_dim: int | None = 1024  # None: no `visual_projection`, so no image_embeds

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise InputError(f"unknown CLIP activation {self.activation!r}; use one of {ACTIVATIONS}")
        if self.hidden_size % self.num_heads:
            raise InputError(f"CLIP width {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.image_size % self.patch_size:
            raise InputError(f"CLIP image size {self.image_size} is not a multiple of the patch {self.patch_size}")

    @property
    def num_tokens(self) -> int:
        """Class token + patches (257 for ViT-H/14 at 224)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_state_dict(cls, state_dict: StateDict, *, num_heads: int | None = None,
                        activation: str | None = None, eps: float = 1e-5) -> CLIPVisionConfig:
        """Read the shape from HF-named tensors (see `to_hf_layout`).

        Layers are counted, patch and image size come from the patch embedding and the position table; heads and
        activation are not stored, so they come from the released towers of that width unless given.
        """
        need = ["vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
                "vision_model.encoder.layers.0.mlp.fc1.weight"]
        missing = [k for k in need if k not in state_dict]
        if missing:
            raise CheckpointError(f"the CLIP vision model needs {missing[0]!r}, which the file lacks")
        hidden, channels, patch, patch_w = state_dict[need[0]].shape
        if channels != 3 or patch != patch_w:
            raise CheckpointError(f"the CLIP patch embedding has shape {list(state_dict[need[0]].shape)}; "
                                  "expected [width, 3, p, p]")
        positions = state_dict[need[1]].shape[0]
        side = round((positions - 1) ** 0.5)
        if side * side + 1 != positions:
            raise CheckpointError(f"the CLIP position table has {positions} rows, not 1 + a square number of patches")
        layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
        if layers != set(range(len(layers))):
            raise CheckpointError(f"the CLIP encoder layers in this file are not numbered 0..N-1 "
                                  f"(found {sorted(layers)})")
        projection = state_dict.get("visual_projection.weight")
        return cls(hidden_size=hidden, intermediate_size=state_dict[need[2]].shape[0], num_layers=len(layers),
                   num_heads=num_heads or _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)), patch_size=patch,
                   image_size=side * patch, eps=eps,
                   activation=activation or _ACTIVATION_BY_WIDTH.get(hidden, "gelu"),
                   projection_dim=None if projection is None else projection.shape[0])


CLIP_VISION_H = CLIPVisionConfig()
CLIP_VISION_TINY = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, patch_size=14,
                                    image_size=28, projection_dim=16)  # tests, stand-ins


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layouts
# ---------------------------------------------------------------------------------------------------------------

HF_ANCHOR = "vision_model.embeddings.patch_embedding.weight"
BARE_ANCHOR = "pre_layrnorm.weight"  # the HF spelling, unique to CLIP
_TOWER_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.layers.", "post_layernorm.")
OPEN_CLIP_ANCHOR = "visual.transformer.resblocks.0.attn.in_proj_weight"
WAN_ANCHOR = "visual.transformer.0.attn.to_qkv.weight"
_LAYER = "vision_model.encoder.layers.{n}."

# open_clip visual-tower name (after `visual.`) -> HF name; `{n}` is the layer index. `attn.in_proj_*` is split.
OPEN_CLIP_TO_HF = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
    "proj": "visual_projection.weight",  # [width, projection] in open_clip: transposed
    "transformer.resblocks.{n}.ln_1.{p}": _LAYER + "layer_norm1.{p}",
    "transformer.resblocks.{n}.attn.in_proj_{p}": _LAYER + "self_attn.{{q,k,v}}_proj.{p}",
    "transformer.resblocks.{n}.attn.out_proj.{p}": _LAYER + "self_attn.out_proj.{p}",
    "transformer.resblocks.{n}.ln_2.{p}": _LAYER + "layer_norm2.{p}",
    "transformer.resblocks.{n}.mlp.c_fc.{p}": _LAYER + "mlp.fc1.{p}",
    "transformer.resblocks.{n}.mlp.c_proj.{p}": _LAYER + "mlp.fc2.{p}",
}

# Wan `XLMRobertaCLIP.visual` name (after `visual.`) -> HF name. `cls_embedding` is [1, 1, D], `pos_embedding`
# [1, L, D], `head` a [D, projection] parameter (transposed); `attn.to_qkv` holds q, k, v stacked on dim 0.
WAN_TO_HF = {
    "patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "cls_embedding": "vision_model.embeddings.class_embedding",
    "pos_embedding": "vision_model.embeddings.position_embedding.weight",
    "pre_norm.weight": "vision_model.pre_layrnorm.weight",
    "pre_norm.bias": "vision_model.pre_layrnorm.bias",
    "post_norm.weight": "vision_model.post_layernorm.weight",
    "post_norm.bias": "vision_model.post_layernorm.bias",
    "head": "visual_projection.weight",
    "transformer.{n}.norm1.{p}": _LAYER + "layer_norm1.{p}",
    "transformer.{n}.attn.to_qkv.{p}": _LAYER + "self_attn.{{q,k,v}}_proj.{p}",
    "transformer.{n}.attn.proj.{p}": _LAYER + "self_attn.out_proj.{p}",
    "transformer.{n}.norm2.{p}": _LAYER + "layer_norm2.{p}",
    "transformer.{n}.mlp.0.{p}": _LAYER + "mlp.fc1.{p}",
    "transformer.{n}.mlp.2.{p}": _LAYER + "mlp.fc2.{p}",
}


def _find_prefix(state_dict: StateDict, anchor: str) -> str | None:
    """The text before `anchor` in the first key that ends with it (None: no such key)."""
    return next((k[: -len(anchor)] for k in state_dict if k.endswith(anchor)), None)


def _convert_visual(state_dict: StateDict, prefix: str, table: dict[str, str], layout: str) -> StateDict:
    """Rename the `prefix`-ed tensors of a visual tower by `table`; q/k/v are split, [1, ...] tables squeezed."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue  # the text tower, logit scale, ...
        name = key[len(prefix):]
        match = re.match(r"(transformer\.(?:resblocks\.)?)(\d+)\.(.+?)([._])(weight|bias)$", name)
        template = f"{match.group(1)}{{n}}.{match.group(3)}{match.group(4)}{{p}}" if match else name
        if template not in table:
            raise CheckpointError(f"unexpected tensor {key!r} in a {layout}-layout CLIP vision file")
        target = table[template].format(n=match.group(2), p=match.group(5)) if match else table[template]
        if "{q,k,v}" in target:
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[target.replace("{q,k,v}", part)] = chunk
        elif target == "visual_projection.weight":
            out[target] = value.t().contiguous()  # [width, projection] -> [projection, width]
        elif target == "vision_model.embeddings.class_embedding":
            out[target] = value.reshape(-1)  # Wan [1, 1, D], open_clip [D]
        elif target == "vision_model.embeddings.position_embedding.weight":
            out[target] = value.reshape(-1, value.shape[-1])  # Wan [1, T, D], open_clip [T, D]
        else:
            out[target] = value
    return out


def to_hf_layout(state_dict: StateDict) -> StateDict:
    """Any supported CLIP vision layout (HF, optionally prefixed or without `vision_model.`; open_clip; Wan `.pth`)
    -> HF names.

    Tensors outside the vision tower (a text tower, `logit_scale`, `position_ids`) are dropped. Raises
    CheckpointError, saying what the file looks like, when it holds no CLIP vision model.
    """
    prefix = _find_prefix(state_dict, HF_ANCHOR)
    if prefix is not None:
        if prefix + "vision_model.embeddings.class_embedding" not in state_dict:
            raise CheckpointError("this is not a CLIP vision model: it has no class token, which looks like a "
                                  "SigLIP vision tower; Wan needs clip_vision_h.safetensors (CLIP ViT-H/14)")
        n = len(prefix)
        return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)
                and k[n:].startswith(("vision_model.", "visual_projection.")) and not k.endswith(".position_ids")}
    prefix = _find_prefix(state_dict, BARE_ANCHOR)
    if prefix is not None and prefix + "embeddings.patch_embedding.weight" in state_dict:
        n = len(prefix)  # transformers >= 5 CLIPVisionModel: the HF names without `vision_model.`
        return {"vision_model." + k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)
                and k[n:].startswith(_TOWER_PARTS) and not k.endswith(".position_ids")}
    prefix = _find_prefix(state_dict, OPEN_CLIP_ANCHOR)
    if prefix is not None:
        return _convert_visual(state_dict, prefix + "visual.", OPEN_CLIP_TO_HF, "open_clip")
    prefix = _find_prefix(state_dict, WAN_ANCHOR)
    if prefix is not None:
        return _convert_visual(state_dict, prefix + "visual.", WAN_TO_HF, "Wan")
    raise CheckpointError(f"this is not a CLIP vision model: {describe_foreign(state_dict)}")


def describe_foreign(state_dict: StateDict) -> str:
    """What a file that is not a CLIP vision model looks like, and what Wan needs instead."""
    return f"{describe(state_dict, 'CLIP vision model')}; Wan needs clip_vision_h.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in float32 whatever the stored dtype; returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.hidden_size)
        self.patch_size = cfg.patch_size

    def forward(self, pixel_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> [B, 1 + (S/p)², D] in `dtype` (class token first)."""
        weight = self.patch_embedding.weight.to(dtype)  # upcast per call: fp16 / bf16 / fp8 files
        x = F.conv2d(pixel_values.to(dtype), weight, stride=self.patch_size).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (ops.Linear(d, d) for _ in range(4))
        self.num_heads = cfg.num_heads
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; softmax scale 1/sqrt(head size), no mask."""
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, backend=self.backend).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.fc1 = ops.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = ops.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.quick = cfg.activation == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.num_layers)])


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.eps)  # sic: the HF spelling
        self.encoder = Encoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.eps)


class ClipVisionOutput:
    """What `encode_image` returns, named as ComfyUI's CLIP_VISION_OUTPUT; items and attributes are the same.

    penultimate_hidden_states [B, T, D]: after all layers but the last, no post_layernorm (what Wan uses).
    last_hidden_state [B, T, D]: after all layers, no post_layernorm (as ComfyUI and transformers).
    image_embeds [B, projection_dim]: visual_projection(post_layernorm(class token)); None without a projection.
    pooler_output [B, D]: post_layernorm(class token). mm_projected: always None (no LLaVA projector).
    All float32 on the device of the input images; last/pooler/image_embeds are None when only the penultimate
    layer was computed.
    """

    def __init__(self, penultimate_hidden_states: torch.Tensor, last_hidden_state: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, pooler_output: torch.Tensor | None = None):
        self.penultimate_hidden_states = penultimate_hidden_states
        self.last_hidden_state = last_hidden_state
        self.image_embeds = image_embeds
        self.pooler_output = pooler_output
        self.mm_projected = None

    def __getitem__(self, key: str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value) -> None:
        setattr(self, key, value)

    def __contains__(self, key: str) -> bool:
        return key in vars(self)

    def get(self, key: str, default=None):
        return vars(self).get(key, default)

    def keys(self):
        return vars(self).keys()


def concat_outputs(*outputs) -> ClipVisionOutput:
    """Several images' outputs as one: their penultimate states joined along the tokens, [B, N1 + N2, D], which is
    how FLF2V reads the start and the end image (ComfyUI's WanFirstLastFrameToVideo joins them the same way).
    Takes ours or core's outputs (anything with `penultimate_hidden_states`)."""
    states = [o.penultimate_hidden_states for o in outputs]
    if len({(s.shape[0], s.shape[-1]) for s in states}) != 1:
        raise InputError(f"CLIP vision outputs of shapes {[list(s.shape) for s in states]} do not join: encode "
                         "each image with the same CLIP vision model, one image each")
    return ClipVisionOutput(torch.cat(states, dim=-2))


class CLIPVisionEncoder(nn.Module):
    """CLIP vision tower: normalised pixels -> per-token states, computed in `compute_dtype` (float32 unless set)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        if cfg.projection_dim is not None:
            self.visual_projection = ops.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        else:
            self.visual_projection = None
        self.compute_dtype = torch.float32
        ops.set_compute_dtype(self, self.compute_dtype)

    def set_compute(self, *, dtype: torch.dtype | None = None, attention: str | None = None) -> None:
        """Choose the matmul dtype and the attention backend (`sora.attention`); None keeps the current."""
        if dtype is not None:
            self.compute_dtype = dtype
            ops.set_compute_dtype(self, dtype)
        if attention is not None:
            check_backend(attention)
            for layer in self.vision_model.encoder.layers:
                layer.self_attn.backend = attention

    def _layer_index(self, layer: int) -> int:
        n = self.config.num_layers
        index = layer + n if layer < 0 else layer
        if not 0 <= index < n:
            raise InputError(f"layer {layer} does not exist; this CLIP vision model has {n} layers "
                             f"(use 0..{n - 1} or -{n}..-1)")
        return index

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise InputError(f"CLIP vision input has shape {list(pixel_values.shape)}; expected [B, 3, {size}, {size}] "
                             "normalised pixels (see `preprocess`)")
        return pixel_values.to(self.vision_model.embeddings.class_embedding.device)

    def forward(self, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """pixel_values [B, 3, S, S] normalised -> [B, T, D], the output of encoder layer `layer`, in compute dtype.

        `layer` indexes the encoder layers (negative from the end): -2 is the penultimate layer Wan uses, after
        31 of 32 layers; -1 the last. No post_layernorm; only the layers up to `layer` run.
        """
        stop = self._layer_index(layer)
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(self._check_pixels(pixel_values), self.compute_dtype))
        for block in vm.encoder.layers[: stop + 1]:
            x = block(x)
        return x

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, *, full: bool = True) -> ClipVisionOutput:
        """pixel_values [B, 3, S, S] normalised -> ClipVisionOutput (float32), all outputs from one pass.

        full=False runs only the layers up to the penultimate one (what Wan needs); last_hidden_state,
        pooler_output and image_embeds are then None.
        """
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(self._check_pixels(pixel_values), self.compute_dtype))
        for block in vm.encoder.layers[:-1]:
            x = block(x)
        penultimate = x  # after num_layers - 1 layers (31 of 32)
        if not full:
            return ClipVisionOutput(penultimate.float())
        x = vm.encoder.layers[-1](x)
        pooled = vm.post_layernorm(x[:, 0])
        embeds = None if self.visual_projection is None else self.visual_projection(pooled).float()
        return ClipVisionOutput(penultimate.float(), x.float(), embeds, pooled.float())

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, crop: bool | str = True, *, full: bool = True) -> ClipVisionOutput:
        """images [B, H, W, 3] in 0..1 (ComfyUI IMAGE) -> ClipVisionOutput on the images' device.

        crop: True / "center" (shortest side to the model's size, then a centre crop, ComfyUI's default) or
        False / "none" (a straight resize, what Wan does). See `preprocess`.
        """
        mode = ("center" if crop else "none") if isinstance(crop, bool) else crop
        device = images.device
        manager = memory.get_manager()
        manager.register(self, name="CLIP vision")
        cfg = self.config
        # Working memory: the MLP's float32 hidden states and a few copies of the token states.
        activation = images.shape[0] * cfg.num_tokens * (cfg.intermediate_size + 8 * cfg.hidden_size) * 4
        with manager.use(self, activation_bytes=activation) as placement:
            pixels = preprocess(images.to(placement.device), mode, size=cfg.image_size)
            out = self.encode(pixels, full=full)
        for key in ("penultimate_hidden_states", "last_hidden_state", "image_embeds", "pooler_output"):
            if out[key] is not None:
                out[key] = out[key].to(device)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and loading
# ---------------------------------------------------------------------------------------------------------------

def preprocess(images: torch.Tensor, crop: str = "center", *, size: int = 224,
               mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """images [B, H, W, C≥3] in 0..1 -> pixel_values [B, 3, size, size] float32, as ComfyUI's `clip_preprocess`.

    In this order: channels past the third (alpha) are dropped; unless the image is already size x size, it is
    resized bicubically with antialiasing, for crop="center" so that the shortest side is `size` (the other
    round(scale·side)) and then centre-cropped (offset (side - size) // 2), for crop="none" straight to size x size;
    then clamped and quantised to 8 bits, round(clamp(255·x, 0, 255)) / 255 (after the resize, so bicubic overshoot
    is clipped); then normalised per channel, (x - mean) / std.
    """
    if crop not in CROPS:
        raise InputError(f"unknown crop {crop!r}; use one of {CROPS}")
    if images.dim() != 4 or images.shape[-1] < 3:
        raise InputError(f"images have shape {list(images.shape)}; expected [B, H, W, 3] (ComfyUI IMAGE)")
    x = images[..., :3].float().movedim(-1, 1)  # [B, 3, H, W]
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if crop == "center":
            scale = size / min(h, w)
            target = (round(scale * h), round(scale * w))
        else:
            target = (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (target[0] - size) // 2, (target[1] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = torch.clamp(255.0 * x, 0, 255).round() / 255.0
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean_t) / std_t


def build_clip_vision(state_dict: StateDict, *, dtype: torch.dtype | None = None,
                      compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      source: str | Path = "checkpoint", **config_overrides) -> CLIPVisionEncoder:
    """A ready-to-run encoder from a state dict of any supported layout, whose tensors it takes over.

    dtype: store the weights in this dtype (None: as in the file; for an fp8 type only the Linear weights).
    config_overrides: `num_heads` / `activation` / `eps` for `CLIPVisionConfig.from_state_dict`.
    """
    try:
        state_dict = to_hf_layout(state_dict)
        config = CLIPVisionConfig.from_state_dict(state_dict, **config_overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    model = build(lambda: CLIPVisionEncoder(config), state_dict, what="CLIP vision model", source=source,
                  weight_dtype=dtype)  # Linear weights (an fp8 scale folded in first)
    if dtype is not None:
        if dtype.itemsize > 1:  # the rest too (biases, norms, embeddings, patch conv); fp8 leaves them as stored
            for module in model.modules():
                for name, param in module.named_parameters(recurse=False):
                    if param.dtype != dtype:
                        setattr(module, name, nn.Parameter(param.data.to(dtype), requires_grad=False))
    model.set_compute(dtype=compute_dtype)
    return model.to(device).eval().requires_grad_(False)


def load_clip_vision(path: str | Path, *, dtype: torch.dtype | None = None,
                     compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     **config_overrides) -> CLIPVisionEncoder:
    """Load a CLIP vision file (`clip_vision_h.safetensors`, an open_clip or Wan `.pth`) into a CLIPVisionEncoder.

    Built on the meta device with the file's tensors assigned (about the weights' size in memory); weights stay
    in the file's dtype unless `dtype` is given and are upcast per call to `compute_dtype` (float32 by default).
    """
    return build_clip_vision(load_state_dict(path), dtype=dtype, compute_dtype=compute_dtype, device=device,
                             source=path, **config_overrides)
