"""The attention dispatch: key multiplicities and masks against explicit softmax attention, backend errors, and 16-bit
attention on the CPU against float32."""
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


def sdpa_before(q, k, v, key_counts):
    """`attention._sdpa` before the CPU 16-bit path (16-bit inputs with a count > 1 attended in float32)."""
    dtype, mask = q.dtype, None
    if key_counts is not None:
        mask = key_counts.to(dtype=torch.float32).log()[:, None, None, :]
        if dtype != torch.float32 and bool((key_counts > 1).any()):
            q, k, v = q.float(), k.float(), v.float()
        mask = mask.to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask)
    return out.transpose(1, 2).to(dtype)


def sample(Lq, Lk, dtype, seed=0, heads=3, d=64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, L, heads, d, generator=gen).to(dtype) for L in (Lq, Lk, Lk))
    counts = torch.randint(0, 3, (2, Lk), generator=gen)
    counts[:, 0] = 1  # every sample keeps a key
    counts[1, -1] = 409  # the text padding row of a 100-token prompt stands for 412 rows; log 409 is inexact in bf16
    return q, k, v, counts


@pytest.mark.parametrize("Lq, Lk", [(1, 4), (7, 101), (300, 257)])
def test_float32_is_unchanged(Lq, Lk):
    q, k, v, counts = sample(Lq, Lk, torch.float32)
    for key_counts in (None, counts.clamp(max=1), counts):
        assert torch.equal(attention(q, k, v, key_counts=key_counts), sdpa_before(q, k, v, key_counts))


def test_16_bit_without_multiplicities_is_unchanged():
    q, k, v, counts = sample(70, 101, torch.bfloat16)
    for key_counts in (None, counts.clamp(max=1)):  # 0/1 counts: a float32 mask of 0 and -inf, as exact as bf16's
        assert torch.equal(attention(q, k, v, key_counts=key_counts), sdpa_before(q, k, v, key_counts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Lq, Lk", [(1, 4), (7, 101), (300, 257)])
def test_16_bit_on_the_cpu_equals_float32(dtype, Lq, Lk):
    """16-bit q, k, v (counts > 1 included) against float32 attention of the same values.

    Tolerance 4·eps of the dtype (2^-6 for bf16), relative to the largest output: the kernel keeps float32 scores
    and rounds the softmax weights (relative u = eps/2 each) and the output (u) to 16 bits; an output element is a
    weighted mean of values, so its error stays near 2u·max|v|. Measured: about 0.3 eps.
    """
    q, k, v, counts = sample(Lq, Lk, dtype)
    tol = 4 * torch.finfo(dtype).eps
    for key_counts in (None, counts):
        out = attention(q, k, v, key_counts=key_counts)
        expected = attention(q.float(), k.float(), v.float(), key_counts=key_counts)
        assert out.dtype == dtype
        assert (out.float() - expected).abs().max() <= tol * expected.abs().max()
    # zero counts drop a key, counts > 1 weigh it as copies: the same as passing the keys repeated
    out = attention(q, k, v, key_counts=counts)
    for b in range(2):
        k_rep, v_rep = (x[b].repeat_interleave(counts[b], dim=0)[None] for x in (k, v))
        expected = softmax_attention(q[b:b + 1], k_rep, v_rep)
        assert (out[b:b + 1].double() - expected).abs().max() <= tol * expected.abs().max()


def test_16_bit_multiplicities_stay_in_16_bits_in_the_flash_kernel(monkeypatch):
    """Counts > 1 no longer upcast q, k, v on the CPU, and the fused kernel runs: no [Lq, Lk] score matrix."""
    q, k, v, counts = sample(300, 101, torch.bfloat16)
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None):
        seen.append((q.dtype, k.dtype, v.dtype, attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        attention(q, k, v, key_counts=counts)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)]
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert not any("math" in op for op in ops)


# ---------------------------------------------------------------------------------------------------------------
# "matmul": query chunks through plain matrix products (the CPU bf16 path)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Lq, Lk", [(1, 4), (7, 101), (300, 257)])
def test_matmul_backend_in_16_bits_equals_float32(dtype, Lq, Lk):
    """Tolerance 4·eps, as for SDPA above: here the scores are rounded to 16 bits too (relative u on logits of
    about 1 to 4 here: at most 2·eps on a softmax weight), which leaves the output's error a weighted mean of
    independent roundings, still well under 4·eps of the largest output."""
    q, k, v, _ = sample(Lq, Lk, dtype)
    out = attention(q, k, v, backend="matmul")
    expected = softmax_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - expected).abs().max() <= 4 * torch.finfo(dtype).eps * expected.abs().max()


def test_matmul_backend_holds_one_chunk_of_scores_at_a_time(monkeypatch):
    """With room for 40 query rows of scores, 300 queries run in 8 chunks, none larger, with the same result."""
    q, k, v, _ = sample(300, 257, torch.bfloat16)
    whole = attention(q, k, v, backend="matmul")
    rows = 40
    monkeypatch.setattr(attention_module, "CHUNK_BYTES", 2 * 3 * 257 * 2 * rows)  # batch x heads x keys x bf16
    matmul, shapes = torch.matmul, []

    def spy(a, b):
        out = matmul(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(attention_module.torch, "matmul", spy)
    chunked = attention(q, k, v, backend="matmul")
    scores = [s for s in shapes if s[-1] == 257]
    assert len(scores) == 8 and max(s[2] for s in scores) == rows
    assert torch.equal(chunked, whole)  # each query row's products and softmax do not depend on the chunking


def test_matmul_backend_hands_float32_and_counted_keys_to_sdpa():
    """Float32 (SDPA is the faster there) and counted keys (their log-count bias needs float32 scores): exactly
    SDPA's result."""
    q, k, v, counts = sample(70, 101, torch.float32)
    assert torch.equal(attention(q, k, v, backend="matmul"), attention(q, k, v))
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, counts = sample(70, 101, dtype)
        assert torch.equal(attention(q, k, v, key_counts=counts, backend="matmul"),
                           attention(q, k, v, key_counts=counts))


def test_matmul_backend_is_always_available_and_opt_in():
    """Available everywhere, off by default; a bf16 DiT on it gives SDPA's output within bf16 rounding."""
    from sora.dit import DiTConfig, WanDiT

    assert "matmul" in available_backends()
    check_backend("matmul")
    model = WanDiT(DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=24, freq_dim=32)).eval()
    assert model.attention_backend == "sdpa"
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"sdpa"}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        x, context = torch.randn(1, 16, 2, 8, 8, generator=gen), torch.randn(1, 7, 24, generator=gen)
        t = torch.tensor([500.0])
        expected = model(x, t, context)
        model.set_compute(dtype=torch.bfloat16)
        sdpa_bf16 = model(x, t, context)
        model.set_compute(attention="matmul")
        out = model(x, t, context)
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"matmul"}
    tol = 4 * 2**-8 * 2**0.5  # benchmarks/dit_forward.py's bf16 bound for 2 layers
    assert not torch.equal(out, sdpa_bf16)  # the matmul path ran
    for result in (out, sdpa_bf16):
        assert (result - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.usefixtures("fresh_manager")
def test_the_loader_node_offers_and_sets_the_matmul_backend():
    from sora.nodes import loaders

    assert "matmul" in loaders.SoraModelLoader.INPUT_TYPES()["required"]["attention"][0]
    handle = loaders.SoraModelLoader().load(loaders.NANO, "default", "bf16", "matmul", loaders.AUTO_EXPERT)[0]
    assert handle.model.attention_backend == "matmul"
    assert {m.backend for m in handle.model.modules() if hasattr(m, "backend")} == {"matmul"}
