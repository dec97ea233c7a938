"""The one place where attention is computed, with a choice of kernel.

Backends:
- "sdpa": PyTorch's `scaled_dot_product_attention`, always available (CPU and GPU; the default).
- "flash_attn": Dao-AILab's flash-attn 2, on CUDA with the package installed.
- "sageattn": SageAttention (quantised attention), on CUDA with the package installed.
- "matmul": 16-bit queries in chunks through plain matrix products and a softmax, no fused kernel. Meant for bf16
  on the CPU, where PyTorch's fused (flash) kernel multiplies at well under the speed of its plain bf16 products
  (measured on an AMD EPYC without AMX, 12 heads x 128: 0.59x SDPA's time at 1,024 tokens, 0.80x at 3,510). The
  scores of each chunk are held in the inputs' dtype (one more rounding than the fused kernel, which keeps them
  float32), and a chunk's scores take at most `CHUNK_BYTES`. Float32 inputs, for which SDPA is the faster, and
  counted keys, whose log-count bias needs float32 scores, go to "sdpa"; so do calls inside torch.compile, whose
  graph would unroll the chunk loop for one token count and compile again for every video size. Opt-in: "sdpa"
  stays the default.

flash-attn and SageAttention only take fp16/bf16; other inputs run in bf16 there, as the Wan reference does,
and the result comes back in the query's dtype.

Key multiplicities (`key_counts`) enter "sdpa" as a log-count mask. With fp16/bf16 inputs the mask stays float32 on
the CPU, whose kernel adds it to float32 scores; on other devices such inputs attend in float32 when a count exceeds
1, because a 16-bit mask cannot hold log n exactly. Float32 inputs are unaffected.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .errors import InputError

BACKENDS = ("sdpa", "flash_attn", "sageattn", "matmul")
CHUNK_BYTES = 32 * 2**20  # the scores of one query chunk ("matmul")

_PACKAGES = {  # backend -> (module to import, how to install it)
    "flash_attn": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "sageattn": ("sageattention", "pip install sageattention"),
}


def available_backends() -> list[str]:
    """Backends usable in this process: "sdpa" and "matmul" always, the others with their package and a CUDA
    device."""
    found = ["sdpa", "matmul"]
    for name, (module, _) in _PACKAGES.items():
        if torch.cuda.is_available() and importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


def check_backend(name: str) -> None:
    """Raise InputError unless `name` is a backend this process can run, saying how to get it."""
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; choose one of {available_backends()}")
    if name in available_backends():
        return
    module, install = _PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        reason = f"the {module} package is not installed (install it with `{install}`)"
    else:
        reason = "it needs a CUDA GPU and none is available"
    raise InputError(f"attention backend {name!r} is not available: {reason}. "
                     f"Available here: {available_backends()}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_counts: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim), no causal mask.

    q [B, Lq, heads, d], k and v [B, Lk, heads, d]. key_counts [B, Lk] (optional, integers) says how many
    identical keys each key stands for: 0 drops a key (padding), n > 1 weighs it as n copies, which lets a caller
    pass a run of repeated keys once. Returns [B, Lq, heads, d] in q's dtype.
    """
    if backend == "matmul" and (key_counts is not None or q.dtype == torch.float32
                               or torch.compiler.is_compiling()):
        backend = "sdpa"
    if backend == "sdpa":
        return _sdpa(q, k, v, key_counts)
    if backend == "matmul":
        return _matmul(q, k, v)
    check_backend(backend)
    if q.device.type != "cuda":
        raise InputError(f"attention backend {backend!r} runs on CUDA only; the model is on {q.device}. "
                         "Use attention='sdpa' on this device")
    kernel = _flash if backend == "flash_attn" else _sage
    if key_counts is None:
        return kernel(q, k, v)
    # These kernels take no key bias: give each sample its keys, repeated as counted.
    outs = []
    for b in range(q.shape[0]):
        counts = key_counts[b].to(k.device)
        outs.append(kernel(q[b:b + 1], k[b].repeat_interleave(counts, dim=0)[None],
                           v[b].repeat_interleave(counts, dim=0)[None]))
    return torch.cat(outs)


def _sdpa(q, k, v, key_counts):
    dtype, mask = q.dtype, None
    if key_counts is not None:
        # softmax over n equal keys = one key whose logit is raised by log n; log 0 = -inf masks a key out
        mask = key_counts.to(device=q.device, dtype=torch.float32).log()[:, None, None, :]
        # log n is not exact in 16 bits (bf16 would weigh 409 copies as 403). On the CPU the kernel adds a float32
        # mask to float32 scores, so q, k, v stay in 16 bits; elsewhere the mask has q's dtype: attend in float32.
        if dtype != torch.float32 and q.device.type != "cpu":
            if bool((key_counts > 1).any()):
                q, k, v = q.float(), k.float(), v.float()
            mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).to(dtype)  # [B, Lq, heads, d]


def workspace_bytes(backend: str, *, batch: int, queries: int, keys: int, heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Working memory of one `attention` call beyond q, k, v and its output. For "matmul" with 16-bit inputs: the
    scaled queries, the keys laid out for the product, and per chunk the scores, their softmax (each at most
    `CHUNK_BYTES`) and the chunk's output. 0 for the fused kernels (their workspace is O(queries))."""
    size = torch.empty(0, dtype=dtype).element_size()
    if backend != "matmul" or size > 2:
        return 0
    rows = min(queries, _chunk_rows(batch * heads * keys * size))
    return 2 * rows * batch * heads * keys * size + (queries + keys + rows) * batch * heads * head_dim * size


def _chunk_rows(row_bytes: int) -> int:
    """Queries per "matmul" chunk whose scores (`row_bytes` per query) fit in `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // row_bytes)


def _matmul(q, k, v):
    B, Lq, heads, d = q.shape
    Lk = k.shape[1]
    q = q.transpose(1, 2) * d ** -0.5  # [B, heads, Lq, d], the scale applied once here
    keys = k.permute(0, 2, 3, 1)  # [B, heads, d, Lk]
    values = v.transpose(1, 2)  # [B, heads, Lk, d]
    out = q.new_empty(B, Lq, heads, d)
    rows = _chunk_rows(B * heads * Lk * q.element_size())
    for start in range(0, Lq, rows):
        scores = torch.matmul(q[:, :, start:start + rows], keys)  # [B, heads, rows, Lk]
        out[:, start:start + rows] = torch.matmul(scores.softmax(dim=-1), values).transpose(1, 2)
    return out


def _half(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)


def _flash(q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(_half(q), _half(k), _half(v)).to(q.dtype)


def _sage(q, k, v):
    from sageattention import sageattn

    return sageattn(_half(q), _half(k), _half(v), tensor_layout="NHD", is_causal=False).to(q.dtype)
