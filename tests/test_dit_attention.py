"""The attention dispatch: key multiplicities and masks against explicit softmax attention, backend errors."""
import pytest
import torch

from sora import attention as attention_module
from sora.attention import attention, available_backends, check_backend
from sora.errors import InputError


def softmax_attention(q, k, v):
    """Textbook attention in float64: q [B, Lq, h, d], k and v [B, Lk, h, d]."""
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)


def test_counts_equal_repeated_keys_and_zero_masks():
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    counts = torch.tensor([[1, 3, 0, 7], [2, 0, 1, 1]])
    out = attention(q, k, v, key_counts=counts)
    for b in range(2):
        k_rep = k[b].repeat_interleave(counts[b], dim=0)[None]
        v_rep = v[b].repeat_interleave(counts[b], dim=0)[None]
        expected = softmax_attention(q[b:b + 1], k_rep, v_rep)
        assert (out[b:b + 1].double() - expected).abs().max() < 1e-6
    assert (attention(q, k, v).double() - softmax_attention(q, k, v)).abs().max() < 1e-6


def test_multiplicity_is_exact_in_bfloat16():
    """bf16 cannot hold log 409 (it rounds to 6.0, i.e. 403 copies); the result must still weigh 409 copies.

    One real key and one padding key of opposite values, balanced so that the output is near 0: a 1.4% error in
    the padding weight would show as an absolute error of about 7e-3, far above bf16's rounding of a value near 0.
    """
    d, n = 8, 409
    k = torch.zeros(1, 2, 1, d)
    k[0, 0, 0, 0] = (d**0.5) * torch.log(torch.tensor(float(n)))  # with q = e_0: logits log n and 0, so balanced
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1
    v = torch.ones(1, 2, 1, d)
    v[0, 1] = -1
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    counts = torch.tensor([[1, n]])
    out = attention(q, k, v, key_counts=counts)
    expected = softmax_attention(q, k.repeat_interleave(counts[0], dim=1), v.repeat_interleave(counts[0], dim=1))
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() < 1e-3


def test_backend_errors(monkeypatch):
    assert "sdpa" in available_backends()
    check_backend("sdpa")
    with pytest.raises(InputError, match="unknown attention backend 'xformers'"):
        check_backend("xformers")
    monkeypatch.setattr(attention_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"sageattention package is not installed.*pip install sageattention"):
        attention(*torch.randn(3, 1, 2, 1, 8), backend="sageattn")
