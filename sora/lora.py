"""Reading Wan LoRA files of every layout found in the wild, as patches keyed by the model's parameter names.

A LoRA file is a flat dict of tensors whose keys name a module of the model and a role. Names come in four
schemes (ECOSYSTEM_FACTS §1.1): the original Wan names (`blocks.0.self_attn.q`, optionally after
`diffusion_model.`), kohya / musubi-tuner (`lora_unet_blocks_0_self_attn_q`: every `.` became `_`), Wan-Fun
(`lora_unet__blocks_...`, a double underscore) and diffusers / PEFT (`transformer.blocks.0.attn1.to_q`, also
after `base_model.model.` or `diffusion_model.`). Roles: a low-rank pair (`lora_down`/`lora_up`, `lora_A`/`lora_B`
and other spellings, an optional `lora_mid` and `alpha`), LoHa (`hada_*`), LoKr (`lokr_*`), and full deltas:
`diff` (the weight, or the parameter itself for non-weight parameters), `diff_b` (the bias), lightx2v's
`blocks.N.diff_m` (the block's modulation) and PEFT's `lora_B.bias` (a bias delta).

`read_lora` turns a file into patches keyed by our parameter names (the original Wan checkpoint keys:
`blocks.0.self_attn.q.weight`, `blocks.3.modulation`, `head.head.weight`, ...). Names are found by matching
against the model's parameter names, so the mapping works for any module the model has. `match` keeps the
patches a given model can take and says why each other key does not apply; `apply_to_state_dict` merges patches
into weights (the oracle the tests use; models apply patches on the fly, see `sora.ops`).

Every patch has `delta(strength, dtype) -> Tensor`, the full-size change of its parameter, computed in float32:
ΔW = strength · scale · product, scale = alpha / rank (1 without alpha), as ComfyUI core applies LoRAs (§1.3).
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_state_dict, read_metadata
from .dit import DIFFUSERS_BLOCK, DIFFUSERS_TOP_LEVEL
from .errors import CheckpointError, InputError

StateDict = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------------------------
# Patches
# ------------------------------------------------------------------------------------------------------------------


def _squeeze_trailing(t: torch.Tensor, keep: int = 2) -> torch.Tensor:
    """Drop trailing size-1 dims beyond the first `keep` (a 1x1 conv factor stored as [a, b, 1, 1] -> [a, b])."""
    while t.ndim > keep and t.shape[-1] == 1:
        t = t.squeeze(-1)
    return t


@dataclass(frozen=True, eq=False)
class LowRank:
    """ΔW = scale · up @ (mid @) down, scale = alpha / rank (1.0 without alpha), rank = down.shape[0].

    down [r, in] (or [r, in, *kernel] for a conv), up [out, r], mid an optional [r, r] (or [r, r, *kernel],
    LoCon's Tucker core; down is then [r, in]). Trailing unit dims of 1x1-conv factors are dropped.
    keys: the file keys it came from (for reports).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    keys: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "up", _squeeze_trailing(self.up))
        object.__setattr__(self, "down", _squeeze_trailing(self.down))
        r = self.down.shape[0]
        if self.up.ndim != 2 or self.up.shape[1] != r:
            raise InputError(f"lora up {list(self.up.shape)} does not fit lora down {list(self.down.shape)}: "
                             f"up must be [out, {r}]")
        if self.mid is not None and (self.mid.shape[:2] != (r, r) or self.down.ndim != 2):
            raise InputError(f"lora mid {list(self.mid.shape)} must be [{r}, {r}, ...] with a 2-D down, "
                             f"got down {list(self.down.shape)}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def shape(self) -> torch.Size:
        """The shape of the delta (a target of equal size and output dim takes it reshaped)."""
        kernel = self.down.shape[2:] if self.mid is None else self.mid.shape[2:]
        return torch.Size((self.up.shape[0], self.down.shape[1], *kernel))

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        up, down = self.up.float(), self.down.float()
        if self.mid is None:
            d = (up @ down.flatten(1)).reshape(self.shape)
        else:
            d = torch.einsum("oa,ab...,bi->oi...", up, self.mid.float(), down)
        return (d * (strength * self.scale)).to(dtype)


@dataclass(frozen=True, eq=False)
class FullDelta:
    """ΔW = diff (no alpha): a `.diff`, `.diff_b`, `diff_m` or PEFT `lora_B.bias` tensor, the target's shape."""

    diff: torch.Tensor
    keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def shape(self) -> torch.Size:
        return self.diff.shape

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.diff.float() * strength).to(dtype)


def _tucker(t: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: core t [r, r, *k], b [r, in], a [r, out] -> [out, in, *k]."""
    return torch.einsum("ij...,jn,im->mn...", t.float(), b.float(), a.float())


@dataclass(frozen=True, eq=False)
class LoHa:
    """ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), scale = alpha / w1_b.shape[0] (1.0 without alpha).

    With Tucker cores t1/t2 [r, r, *kernel] (LyCORIS conv), w*_a are [r, out] and each factor is rebuilt from
    its core.
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    keys: tuple[str, ...] = field(default=(), compare=False)

    def _factor(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        return a.float() @ b.float() if t is None else _tucker(t, b, a)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.w1_b.shape[0]

    @property
    def shape(self) -> torch.Size:
        if self.t1 is None:
            return torch.Size((self.w1_a.shape[0], self.w1_b.shape[1]))
        return torch.Size((self.w1_a.shape[1], self.w1_b.shape[1], *self.t1.shape[2:]))

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m1 = self._factor(self.w1_a, self.w1_b, self.t1)
        m2 = self._factor(self.w2_a, self.w2_b, self.t2)
        return (m1 * m2 * (strength * self.scale)).to(dtype)


@dataclass(frozen=True, eq=False)
class LoKr:
    """ΔW = scale · kron(w1, w2); each factor full (`lokr_w1`) or low-rank (`lokr_w1_a @ lokr_w1_b`; w2 also
    from a Tucker core `lokr_t2`). scale = alpha / rank of the low-rank factor (w2's when both are), 1.0 when both
    factors are full or there is no alpha."""

    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    keys: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.w1 is None and (self.w1_a is None or self.w1_b is None):
            raise InputError("LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2_a is None or self.w2_b is None):
            raise InputError("LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b")

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2_b, self.w2_a)
        else:
            w2 = self.w2_a.float() @ self.w2_b.float()
        return w1.reshape(*w1.shape, *(1,) * max(0, w2.ndim - w1.ndim)), w2

    @property
    def scale(self) -> float:
        rank = self.w2_b.shape[0] if self.w2 is None else self.w1_b.shape[0] if self.w1 is None else None
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    @property
    def shape(self) -> torch.Size:
        w1 = self.w1.shape if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            w2 = self.w2.shape
        elif self.t2 is not None:
            w2 = (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])
        else:
            w2 = (self.w2_a.shape[0], self.w2_b.shape[1])
        return torch.Size((w1[0] * w2[0], w1[1] * w2[1], *w2[2:]))

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w1, w2 = self._factors()
        return (torch.kron(w1, w2) * (strength * self.scale)).to(dtype)


Patch = LowRank | FullDelta | LoHa | LoKr


@dataclass
class LoraFile:
    """A LoRA file read by `read_lora`.

    patches: {our parameter name: [patches, in file order]}; unused: keys it could not interpret, with the reason
    for each in `reasons`; layout: the naming scheme(s) recognised ("original", "kohya", "wan-fun", "diffusers",
    joined by "+" when a file mixes them, "unknown" when none).
    """

    patches: dict[str, list[Patch]]
    unused: list[str]
    layout: str
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """Every file key that went into a patch."""
        return [k for plist in self.patches.values() for p in plist for k in p.keys]


# ------------------------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------------------------

# (suffix, group, role); matched longest first. Groups: lora, loha, lokr, alpha, and the full-delta kinds.
_SUFFIXES = [
    *((s, "lora", "down") for s in (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", ".lora_A",
                                    "_lora.down.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")),
    *((s, "lora", "up") for s in (".lora_up.weight", ".lora_B.weight", ".lora_B.default.weight", ".lora_B",
                                  "_lora.up.weight", ".lora.up.weight", ".lora_linear_layer.up.weight")),
    (".lora_mid.weight", "lora", "mid"),
    *((f".hada_{r}", "loha", r) for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{r}", "lokr", r) for r in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
    (".alpha", "alpha", "alpha"),
    (".diff", "diff", "diff"),
    (".diff_b", "diff_b", "diff_b"),
    (".diff_m", "diff_m", "diff_m"),
    (".lora_B.bias", "lora_bias", "lora_bias"),
    (".lora_B.default.bias", "lora_bias", "lora_bias"),
]
_SUFFIXES.sort(key=lambda s: -len(s[0]))
_UNSUPPORTED = {
    ".dora_scale": "DoRA magnitude vectors are not supported (the LoRA part of this module is applied without it)",
    ".reshape_weight": "reshape_weight is not supported",
    ".set_weight": "set_weight (replacing a weight outright) is not supported",
    ".w_norm": "w_norm/b_norm patches are not supported",
    ".b_norm": "w_norm/b_norm patches are not supported",
}
# Name prefixes: (prefix, scheme). kohya-style prefixes precede underscore-joined names.
_KOHYA_PREFIXES = (("lora_unet__", "wan-fun"), ("lora_unet_", "kohya"), ("lora_transformer_", "kohya"),
                   ("lycoris_", "kohya"))
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_BLOCK = re.compile(r"((?:vace_)?blocks)\.(\d+)\.(.+)")
_KOHYA_BLOCK = re.compile(r"((?:vace_)?blocks)_(\d+)_(.+)")
_LEAVES = (".weight", ".bias")

# The I2V / FLF2V image branch (Wan 2.1 I2V-14B, ECOSYSTEM_FACTS §5.2), added to the default names whether or not
# this model class builds it yet, so that such LoRAs read fully and `match` can say what they are for.
_IMAGE_BRANCH = (
    *(f"blocks.0.cross_attn.{m}.{leaf}" for m in ("k_img", "v_img") for leaf in ("weight", "bias")),
    "blocks.0.cross_attn.norm_k_img.weight",
    *(f"img_emb.proj.{i}.{leaf}" for i in (0, 1, 3, 4) for leaf in ("weight", "bias")),
    "img_emb.emb_pos",
)


@functools.cache
def default_param_names() -> tuple[str, ...]:
    """Parameter names of a representative Wan DiT: one block of a meta-device `WanDiT`, plus the image branch."""
    from .dit import PRESETS, DiTConfig, WanDiT

    with torch.device("meta"):
        model = WanDiT(DiTConfig(**{**PRESETS["tiny"].__dict__, "num_layers": 1}))
    return tuple(dict.fromkeys([*model.state_dict(), *_IMAGE_BRANCH]))


def _split_block(name: str, pattern: re.Pattern) -> tuple[str, str | None, str]:
    """'blocks.3.x.y' -> ('blocks', '3', 'x.y'); top-level names -> ('', None, name)."""
    m = pattern.fullmatch(name)
    return (m[1], m[2], m[3]) if m else ("", None, name)


def _to_diffusers(group: str, rest: str) -> str | None:
    """Our module path or parameter name (block-relative inside a block group) -> diffusers' name, if any."""
    table = _INV_BLOCK if group else _INV_TOP
    if rest in table:
        return table[rest]
    module, _, leaf = rest.rpartition(".")
    return f"{table[module]}.{leaf}" if module in table else None


_INV_BLOCK = {ours: theirs for theirs, ours in DIFFUSERS_BLOCK.items()}
_INV_TOP = {ours: theirs for theirs, ours in DIFFUSERS_TOP_LEVEL.items() if ours != theirs}


class _Names:
    """Lookup of LoRA base names (dotted or kohya, original or diffusers) -> our names, block index free."""

    def __init__(self, param_names: Iterable[str]):
        self.params: set[tuple[str, str]] = set()
        dotted: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)  # -> {(target, scheme)}
        kohya: dict[tuple[str, str], set[str]] = defaultdict(set)
        for name in param_names:
            group, _, rest = _split_block(name, _BLOCK)
            self.params.add((group, rest))
            targets = [rest] + [rest[: -len(leaf)] for leaf in _LEAVES if rest.endswith(leaf)]
            for target in targets:
                dotted[(group, target)].add((target, "original"))
                kohya[(group, target.replace(".", "_"))].add(target)
                theirs = _to_diffusers(group, target)
                if theirs is not None and theirs != target:
                    dotted[(group, theirs)].add((target, "diffusers"))
                    kohya[(group, theirs.replace(".", "_"))].add(target)
        # An ambiguous name (two targets) is left out; the original meaning wins over a diffusers one.
        self.dotted = {}
        for key, found in dotted.items():
            originals = {t for t, s in found if s == "original"}
            targets = originals or {t for t, _ in found}
            if len(targets) == 1:
                scheme = "original" if originals else "diffusers"
                self.dotted[key] = (targets.pop(), scheme)
        self.kohya = {key: found.pop() for key, found in kohya.items() if len(found) == 1}
        # Names spelled the same in both schemes (patch_embedding) say nothing about a file's layout.
        self.shared = {key for key, (target, scheme) in self.dotted.items()
                       if scheme == "original" and _to_diffusers(key[0], target) in (None, target)}

    def resolve(self, base: str) -> tuple[str, bool, str | None] | None:
        """A LoRA base name -> (our module path or parameter name, whether it is a parameter, scheme or None)."""
        for prefix, scheme in _KOHYA_PREFIXES:
            if base.startswith(prefix):
                group, index, rest = _split_block(base[len(prefix):], _KOHYA_BLOCK)
                target = self.kohya.get((group, rest))
                if target is None:
                    return None
                return self._name(group, index, target), (group, target) in self.params, scheme
        stripped = True
        while stripped:
            stripped = False
            for prefix in _DOTTED_PREFIXES:
                if base.startswith(prefix):
                    base, stripped = base[len(prefix):], True
        group, index, rest = _split_block(base, _BLOCK)
        found = self.dotted.get((group, rest))
        if found is None:
            return None
        target, scheme = found
        shared = (group, rest) in self.shared
        return self._name(group, index, target), (group, target) in self.params, None if shared else scheme

    @staticmethod
    def _name(group: str, index: str | None, rest: str) -> str:
        return f"{group}.{index}.{rest}" if group else rest


@functools.cache
def _default_names() -> _Names:
    return _Names(default_param_names())


def kohya_name(param_name: str) -> str:
    """Our parameter name -> the kohya base name of its module ('blocks.0.ffn.0.weight' -> 'lora_unet_blocks_0_ffn_0').

    Non-weight parameters keep their last part ('blocks.0.modulation' -> 'lora_unet_blocks_0_modulation').
    """
    base = param_name.removesuffix(".weight")
    return "lora_unet_" + base.replace(".", "_")


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------

def _split_key(key: str) -> tuple[str, str, str] | None:
    for suffix, group, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], group, role
    return None


def _alpha_value(t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise InputError(f"alpha must be one number, got shape {list(t.shape)}")
    return float(t.float().reshape(()))


def _peft_alphas(metadata: Mapping[str, str] | None):
    """alpha(module, rank) from diffusers' `lora_adapter_metadata` (a PEFT LoraConfig), or None without one."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError):
        return None
    if "lora_alpha" not in config:
        return None
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def alpha(module: str, rank: int) -> float:
        value = config["lora_alpha"]
        for pattern, a in patterns.items():
            regex = pattern + "$" if pattern.startswith("^") else r"(?:.*\.)?" + pattern + "$"
            if re.match(regex, module):
                value = a
                break
        return float(value) * (math.sqrt(rank) if rslora else 1.0)  # rsLoRA scales by alpha / sqrt(rank)

    return alpha


def read_lora(source: str | Path | Mapping[str, torch.Tensor], param_names: Iterable[str] | None = None,
              metadata: Mapping[str, str] | None = None) -> LoraFile:
    """Read a LoRA file (a path or a dict of tensors) into patches keyed by our parameter names.

    param_names: the names of the model's parameters to map onto (default: `default_param_names()`, a Wan DiT
    with the I2V image branch; block indices are free, so any block count maps). metadata: safetensors metadata
    for a dict source (read from the file for a path); diffusers' `lora_adapter_metadata` gives PEFT files their
    alpha. Keys of other models or of unsupported kinds end in `unused`. Raises CheckpointError for unreadable
    files.
    """
    if isinstance(source, (str, Path)):
        state_dict = load_state_dict(source)
        if metadata is None:
            metadata = read_metadata(source)
    elif isinstance(source, Mapping):
        state_dict = dict(source)
    else:
        raise InputError(f"a LoRA source is a path or a dict of tensors, got {type(source).__name__}")
    names = _default_names() if param_names is None else _Names(param_names)
    peft_alpha = _peft_alphas(metadata)

    groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)  # (base, group) -> {role: key}
    alphas: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"LoRA entry {key!r} is not a tensor")
        unsupported = next((why for s, why in _UNSUPPORTED.items() if key.endswith(s)), None)
        split = None if unsupported else _split_key(key)
        if split is None:
            reasons[key] = unsupported or "not a LoRA key (unknown suffix)"
            continue
        base, group, role = split
        if group == "alpha":
            alphas[base] = key
        else:
            groups[(base, group)][role] = key

    patches: dict[str, list[Patch]] = defaultdict(list)
    schemes: Counter[str] = Counter()
    recognised = False
    used_alphas: set[str] = set()
    for (base, group), roles in groups.items():
        keys = tuple(roles.values())
        if group == "diff_m":
            resolved = names.resolve(base + ("_modulation" if base.startswith("lora_") else ".modulation"))
        else:
            resolved = names.resolve(base)
        if resolved is None:
            for k in keys:
                reasons[k] = f"{base} matches no module of the model"
            continue
        target, is_param, scheme = resolved
        recognised = True
        if scheme:
            schemes[scheme] += len(keys)
        if group == "diff_b" or group == "lora_bias":
            if is_param:
                for k in keys:
                    reasons[k] = f"{target} is a parameter, not a module with a bias"
                continue
            target = target + ".bias"
        elif not is_param:
            target = target + ".weight"
        alpha_key = alphas.get(base) if group in ("lora", "loha", "lokr") else None
        alpha = None if alpha_key is None else state_dict[alpha_key]
        try:
            alpha = None if alpha is None else _alpha_value(alpha)
            patch = _build(group, {r: state_dict[k] for r, k in roles.items()}, alpha,
                           keys + ((alpha_key,) if alpha_key else ()))
        except (InputError, KeyError) as e:
            missing = f"lacks its {e.args[0]}" if isinstance(e, KeyError) else str(e)
            for k in keys:
                reasons[k] = f"{base}: {missing}"
            if alpha_key:
                reasons[alpha_key] = f"{base}: {missing}"
                used_alphas.add(alpha_key)
            continue
        if alpha_key:
            used_alphas.add(alpha_key)
        elif isinstance(patch, LowRank) and peft_alpha is not None:
            module = base
            for prefix in _DOTTED_PREFIXES:
                module = module.removeprefix(prefix)
            patch = LowRank(patch.down, patch.up, peft_alpha(module, patch.rank), patch.mid, patch.keys)
        patches[target].append(patch)
    for base, key in alphas.items():
        if key not in used_alphas:
            reasons[key] = f"an alpha without a low-rank pair for {base}"

    layout = "+".join(sorted(schemes)) if schemes else "original" if recognised else "unknown"
    unused = [k for k in state_dict if k in reasons]
    return LoraFile(dict(patches), unused, layout, {k: reasons[k] for k in unused})


def _build(group: str, t: dict[str, torch.Tensor], alpha: float | None, keys: tuple[str, ...]) -> Patch:
    """One patch from the tensors of one base name and group (KeyError names a missing role)."""
    if group == "lora":
        for role in ("down", "up"):
            if role not in t:
                raise KeyError(f"lora {role} matrix")
        return LowRank(t["down"], t["up"], alpha, t.get("mid"), keys)
    if group == "loha":
        for role in ("w1_a", "w1_b", "w2_a", "w2_b"):
            if role not in t:
                raise KeyError(f"hada_{role}")
        return LoHa(t["w1_a"], t["w1_b"], t["w2_a"], t["w2_b"], alpha, t.get("t1"), t.get("t2"), keys)
    if group == "lokr":
        return LoKr(**{r: t.get(r) for r in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")}, alpha=alpha,
                    keys=keys)
    return FullDelta(t[group], keys)


# ------------------------------------------------------------------------------------------------------------------
# Matching a model
# ------------------------------------------------------------------------------------------------------------------

def _fits(patch: Patch, shape: torch.Size) -> bool:
    """Full deltas need the target's shape up to unit dims; products need its size and output dim (ComfyUI
    reshapes a LoRA product to the weight)."""
    own = patch.shape
    if isinstance(patch, FullDelta):
        return own == shape or (own.numel() == shape.numel() and
                                [d for d in own if d != 1] == [d for d in shape if d != 1])
    return own.numel() == shape.numel() and len(shape) > 0 and own[0] == shape[0]


def _missing_reason(target: str, param_shapes: Mapping[str, torch.Size]) -> str:
    module = next((target[: -len(leaf)] for leaf in _LEAVES if target.endswith(leaf)), target)
    if module != target and any(k.startswith(module + ".") for k in param_shapes):
        return f"the model's {module} has no {target.rsplit('.', 1)[1]}"
    if any(s in target for s in (".k_img", ".v_img", ".norm_k_img", "img_emb.")):
        return f"the model has no {module} (an image-to-video LoRA on a text-to-video model?)"
    if target.startswith("vace_"):
        return f"the model has no {module} (a VACE LoRA on a model without VACE?)"
    group, index, _ = _split_block(target, _BLOCK)
    if group:
        blocks = {k.split(".")[1] for k in param_shapes if k.startswith(group + ".")}
        if blocks and index not in blocks:
            return f"the model has no {group}.{index} (it has {len(blocks)}: a LoRA for a larger model?)"
    return f"the model has no {module}"


def match(lora: LoraFile, param_shapes: Mapping[str, torch.Size]) -> tuple[dict[str, list[Patch]], list[str]]:
    """The patches this model can take, and "key: reason" for every file key that does not apply to it.

    param_shapes: {our parameter name: shape}. A patch applies when its target exists and its delta fits the
    target's shape; keys `read_lora` could not interpret are listed too, with their reason.
    """
    matched: dict[str, list[Patch]] = {}
    unmatched: list[str] = []
    for target, plist in lora.patches.items():
        shape = param_shapes.get(target)
        for patch in plist:
            if shape is None:
                reason = _missing_reason(target, param_shapes)
            elif not _fits(patch, torch.Size(shape)):
                reason = (f"its delta has shape {list(patch.shape)} but {target} is {list(shape)} "
                          "(a LoRA for another model size?)")
            else:
                matched.setdefault(target, []).append(patch)
                continue
            unmatched.extend(f"{k}: {reason}" for k in patch.keys)
    unmatched.extend(f"{k}: {lora.reasons[k]}" for k in lora.unused)
    return matched, unmatched


def apply_to_state_dict(state_dict: Mapping[str, torch.Tensor], patches: Mapping[str, Patch | list[Patch]],
                        strength: float = 1.0) -> StateDict:
    """A new state dict with W + strength · ΣΔ for each patched parameter, summed in float32 and cast back to W's
    dtype (unpatched tensors are shared). Raises InputError for a target it lacks or a delta that does not fit."""
    out = dict(state_dict)
    for target, plist in patches.items():
        if target not in state_dict:
            raise InputError(f"the state dict has no {target}; filter the patches with sora.lora.match first")
        weight = state_dict[target]
        total = weight.float().clone()
        for patch in plist if isinstance(plist, (list, tuple)) else [plist]:
            delta = patch.delta(strength).to(total.device)
            if delta.numel() != total.numel():
                raise InputError(f"a patch of shape {list(delta.shape)} does not fit {target} {list(weight.shape)}")
            total += delta.reshape(total.shape)
        out[target] = total.to(weight.dtype)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Onto a model handle
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Applied:
    """A LoRA file matched to one model: the handle patches, and what did not apply.

    patches: one `sora.handle.WeightPatch` per matched patch; matched_keys / total_keys: file keys that went into
    them / in the file; unmatched: "key: reason" for each other key; layout: as `LoraFile.layout`.
    """
    patches: tuple
    matched_keys: int
    total_keys: int
    unmatched: list[str]
    layout: str

    def summary(self, name: str) -> str:
        """One line for the log and the node: "name: 400 of 400 keys applied (original layout)"."""
        return f"{name}: {self.matched_keys} of {self.total_keys} keys applied ({self.layout} layout)"


def apply_lora(lora: LoraFile, model: nn.Module, strength: float, *, name: str = "LoRA") -> Applied:
    """The patches of `lora` that fit `model` (a `WanDiT`), at `strength`, for `ModelHandle.patched`.

    Raises CheckpointError when nothing in the file applies: it is a LoRA of another model family (named when it
    looks like one) or of another Wan variant."""
    from . import ops
    from .handle import WeightPatch

    matched, unmatched = match(lora, ops.parameter_shapes(model))
    keys = sum(len(p.keys) for plist in matched.values() for p in plist)
    total = keys + len(unmatched)
    if not matched:
        family = guess_family([line.split(": ", 1)[0] for line in unmatched] + lora.keys)
        kind = f"it looks like a {family} LoRA" if family and family != "Wan" else \
            "its keys are for another Wan model (size or variant)" if family == "Wan" else \
            "none of its keys names a part of a Wan diffusion model"
        first = "; ".join(unmatched[:3])
        raise CheckpointError(f"{name}: no key of this LoRA fits the model ({kind}); for example {first}")
    patches = tuple(WeightPatch(target, patch, float(strength), name)
                    for target, plist in matched.items() for patch in plist)
    return Applied(patches, keys, total, unmatched, lora.layout)


# ------------------------------------------------------------------------------------------------------------------
# Other families
# ------------------------------------------------------------------------------------------------------------------

def _max_index(keys: list[str], pattern: str) -> int:
    found = [int(m[1]) for k in keys for m in [re.search(pattern, k)] if m]
    return max(found, default=-1)


def guess_family(keys: Iterable[str]) -> str | None:
    """The model family a LoRA's keys look like: "SDXL", "SD 1.5 / SDXL", "SD3", "HunyuanVideo", "Flux",
    "LTX-Video", "Wan", or None when nothing is recognised. For saying what a file that fits no Wan model is."""
    keys = list(keys)

    def has(*fragments: str) -> bool:
        return any(f in k for k in keys for f in fragments)

    # kohya SDXL files name the UNet's original blocks (input_blocks) and two text encoders; SD 1.5 and
    # diffusers-layout SDXL files use down_blocks / up_blocks.
    if has("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
           "lora_unet_middle_block_"):
        return "SDXL"
    if has("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_", "lora_te_", "down_blocks.",
           "up_blocks."):
        return "SD 1.5 / SDXL"
    if has("joint_blocks"):
        return "SD3"
    double = has("double_blocks", "single_blocks")
    diffusers_mmdit = has("single_transformer_blocks")
    if double or diffusers_mmdit:
        # HunyuanVideo: its token refiner and img_in.proj, or more double/single blocks than Flux's 19/38.
        hunyuan = has("token_refiner", "input_embedder", "img_in.proj", "img_in_proj") or \
            _max_index(keys, r"double_blocks[._](\d+)") >= 19 or _max_index(keys, r"single_blocks[._](\d+)") >= 38 \
            or _max_index(keys, r"(?<!single_)transformer_blocks[._](\d+)") >= 19 \
            or _max_index(keys, r"single_transformer_blocks[._](\d+)") >= 38
        return "HunyuanVideo" if hunyuan else "Flux"
    if has("transformer_blocks") and has("attn1.", "attn1_") and \
            has("adaln_single", "caption_projection", "attn2.", "attn2_"):
        return "LTX-Video"
    names = _default_names()
    for key in keys:
        split = _split_key(key)
        if split is not None:
            base = split[0] + ("_modulation" if split[0].startswith("lora_") else ".modulation") \
                if split[1] == "diff_m" else split[0]
            if names.resolve(base) is not None:
                return "Wan"
    return None
