"""segflex.attention on CPU against the float64 reference of tests/oracle.py.

Error rule: the max abs error of segflex against the float64 reference must be
at most twice the max abs error of torch's scaled_dot_product_attention run in
the same precision on the oracle's dense mask (K/V repeated for GQA), plus a
small absolute floor. Rows that have no allowed key exist only past the end of
a padded sequence: with a valid layout the diagonal is always allowed
(test_layout checks that), so every real query row has at least one key.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import segflex
from conftest import DTYPES, FLOOR, LSE_TOL, randn, sdpa_rows, to_layouts
from oracle import (Spec, attention_reference, batches, pack, reference_packed, spec_bias,
                    spec_mask)

def check_padded(q, k, v, specs, out, lse=None, scale=None):
    """Compare a padded-batch result with the reference under the error rule."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    ours_err = sdpa_err = 0.0
    for b, spec in enumerate(specs):
        mask = spec_mask(spec, q_len=Lq, kv_len=Lk)
        bias = spec_bias(spec, q_len=Lq, kv_len=Lk)
        ref, ref_lse = attention_reference(q[b], k[b], v[b], mask, bias, sc)
        got = out[b].float().numpy().astype(np.float64)
        dead = ~mask.any(axis=1)
        assert np.all(got[:, dead] == 0), f"sequence {b}: rows past its end must be zero"
        ours_err = max(ours_err, float(np.abs(got - ref).max()))
        peer = sdpa_rows(q[b], k[b], v[b], mask, bias, sc).double().numpy()
        sdpa_err = max(sdpa_err, float(np.abs(peer - ref).max()))
        if lse is not None:
            got_lse = np.asarray(lse[b], dtype=np.float64)
            assert np.all(np.isneginf(got_lse[:, dead])), "lse of rows past the end must be -inf"
            np.testing.assert_allclose(got_lse[:, ~dead], ref_lse[:, ~dead],
                                       atol=LSE_TOL[q.dtype], rtol=1e-5)
    bound = 2 * sdpa_err + FLOOR[q.dtype]
    assert ours_err <= bound, f"max abs error {ours_err:.3g} > 2 x SDPA's {sdpa_err:.3g} + floor"


def make_qkv(specs, Hq, Hkv, D, dtype, q_len=None, kv_len=None, seed=0):
    L = max(len(s) for s in specs) if kv_len is None else kv_len
    Lq = L if q_len is None else q_len
    B = len(specs)
    return (randn((B, Hq, Lq, D), dtype, seed), randn((B, Hkv, L, D), dtype, seed + 1),
            randn((B, Hkv, L, D), dtype, seed + 2))


# -------------------------------------------------------------- property sweep


@st.composite
def attention_cases(draw, max_batch=3, max_total=260):
    specs = draw(batches(max_batch=max_batch, max_total=max_total))
    D = draw(st.sampled_from([1, 16, 64, 100, 128, 256]))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    Hkv = draw(st.sampled_from([1, 2]))
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    L = max(len(s) for s in specs)
    q_len = draw(st.one_of(st.just(L), st.integers(1, L)))
    return specs, Hkv * group, Hkv, D, dtype, q_len


@given(attention_cases())
@settings(max_examples=80)
def test_attention_matches_reference(case):
    specs, Hq, Hkv, D, dtype, q_len = case
    q, k, v = make_qkv(specs, Hq, Hkv, D, dtype, q_len=q_len, seed=D + Hq)
    out, lse = segflex.attention(q, k, v, to_layouts(specs), return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (len(specs), Hq, q_len) and lse.dtype == torch.float32
    check_padded(q, k, v, specs, out, lse)


@pytest.mark.slow
@given(attention_cases(max_batch=5, max_total=1500))
@settings(max_examples=150)
def test_attention_matches_reference_long(case):
    specs, Hq, Hkv, D, dtype, q_len = case
    q, k, v = make_qkv(specs, Hq, Hkv, D, dtype, q_len=q_len, seed=D + Hq + 1)
    out, lse = segflex.attention(q, k, v, to_layouts(specs), return_lse=True)
    check_padded(q, k, v, specs, out, lse)


# ------------------------------------------------------------ explicit sweeps

ENSEMBLE = Spec((23, 31, 40, 29, 3), ("shared", "isolated", "isolated", "isolated", "global"),
                (0.0, -math.log(3), -math.log(3), -math.log(3), 0.0))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("D", [1, 16, 64, 100, 128, 256])
def test_head_dims_and_dtypes(D, dtype):
    q, k, v = make_qkv([ENSEMBLE], 4, 2, D, dtype, seed=D)
    out = segflex.attention(q, k, v, to_layouts([ENSEMBLE]))
    check_padded(q, k, v, [ENSEMBLE], out)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_gqa_ratios(group):
    q, k, v = make_qkv([ENSEMBLE], 2 * group, 2, 64, torch.float32, seed=group)
    out, lse = segflex.attention(q, k, v, to_layouts([ENSEMBLE]), return_lse=True)
    check_padded(q, k, v, [ENSEMBLE], out, lse)


def test_long_sequence_fp32():
    """Lengths past typical block sizes: 5 paraphrases of ~250 tokens."""
    spec = Spec((60, 250, 251, 249, 260, 250, 7), ("shared",) + ("isolated",) * 5 + ("global",),
                (0.0,) + (-math.log(5),) * 5 + (0.0,))
    q, k, v = make_qkv([spec], 4, 1, 64, torch.float32, seed=7)
    out, lse = segflex.attention(q, k, v, to_layouts([spec]), return_lse=True)
    check_padded(q, k, v, [spec], out, lse)


def test_custom_scale():
    q, k, v = make_qkv([ENSEMBLE], 2, 1, 32, torch.float32, seed=3)
    out, lse = segflex.attention(q, k, v, to_layouts([ENSEMBLE]), scale=0.37, return_lse=True)
    check_padded(q, k, v, [ENSEMBLE], out, lse, scale=0.37)


def test_single_layout_not_in_a_list():
    q, k, v = make_qkv([ENSEMBLE], 2, 1, 16, torch.float32, seed=4)
    out = segflex.attention(q, k, v, to_layouts([ENSEMBLE])[0])
    check_padded(q, k, v, [ENSEMBLE], out)


# ------------------------------------------------------------- batches, NumPy


def test_padded_batch_of_different_lengths():
    specs = [ENSEMBLE, Spec((1,), ("global",)), Spec((40, 2), ("isolated", "global"), (1.5, 0.0)),
             Spec((3, 3, 3), ("isolated",) * 3)]
    q, k, v = make_qkv(specs, 4, 2, 64, torch.float32, seed=11)
    out, lse = segflex.attention(q, k, v, to_layouts(specs), return_lse=True)
    check_padded(q, k, v, specs, out, lse)
    # explicit: the 1-token sequence has exactly one live row (row 0), the rest is zero
    assert torch.all(out[1, :, 1:] == 0) and torch.all(torch.isneginf(lse[1, :, 1:]))


def test_padded_kv_longer_than_every_layout():
    specs = [Spec((10, 10, 5), ("shared", "isolated", "global")), Spec((7,), ("isolated",))]
    q, k, v = make_qkv(specs, 2, 1, 32, torch.float32, kv_len=40, seed=12)
    out, lse = segflex.attention(q, k, v, to_layouts(specs), return_lse=True)
    check_padded(q, k, v, specs, out, lse)


@pytest.mark.parametrize("q_len", [1, 7, 64, 99])
def test_chunked_prefill(q_len):
    """q_len < kv_len: the queries are the last q_len positions."""
    specs = [ENSEMBLE, Spec((50, 30, 19), ("shared", "isolated", "isolated"))]
    q, k, v = make_qkv(specs, 4, 2, 64, torch.float32, q_len=q_len, seed=q_len)
    out, lse = segflex.attention(q, k, v, to_layouts(specs), return_lse=True)
    check_padded(q, k, v, specs, out, lse)


def test_numpy_fp32_input():
    specs = [ENSEMBLE, Spec((5, 6), ("isolated", "global"))]
    q, k, v = make_qkv(specs, 4, 2, 64, torch.float32, seed=13)
    out, lse = segflex.attention(q.numpy(), k.numpy(), v.numpy(), to_layouts(specs), return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == tuple(q.shape)
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32
    check_padded(q, k, v, specs, torch.from_numpy(out), lse)


@pytest.mark.parametrize("q_short", [False, True])
def test_packed_varlen(q_short):
    specs = [ENSEMBLE, Spec((1,), ("global",)), Spec((40, 41, 2), ("shared", "isolated", "global")),
             Spec((17,), ("isolated",))]
    lens = [len(s) for s in specs]
    q_lens = [max(1, n // 3) if q_short else n for n in lens]
    Hq, Hkv, D = 6, 2, 64
    qs = [randn((Hq, n, D), torch.float32, 20 + i) for i, n in enumerate(q_lens)]
    ks = [randn((Hkv, n, D), torch.float32, 40 + i) for i, n in enumerate(lens)]
    vs = [randn((Hkv, n, D), torch.float32, 60 + i) for i, n in enumerate(lens)]
    q, cu_q = pack(qs, q_lens)
    k, cu_k = pack(ks, lens)
    v, _ = pack(vs, lens)
    out, lse = segflex.attention(q, k, v, to_layouts(specs), return_lse=True,
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
    ref, ref_lse = reference_packed(q, k, v, specs, cu_q, cu_k)
    # SDPA peer, sequence by sequence
    sdpa_err = 0.0
    for b, spec in enumerate(specs):
        qb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)
        kb = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)
        vb = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)
        mask = spec_mask(spec, q_len=q_lens[b], kv_len=lens[b])
        peer = sdpa_rows(qb, kb, vb, mask, spec_bias(spec, q_len=q_lens[b], kv_len=lens[b]),
                         1 / math.sqrt(D))
        sdpa_err = max(sdpa_err, float((peer.double().numpy()
                                        - ref[cu_q[b]:cu_q[b + 1]].transpose(1, 0, 2)).__abs__().max()))
    err = float(np.abs(out.double().numpy() - ref).max())
    assert err <= 2 * sdpa_err + FLOOR[torch.float32], (err, sdpa_err)
    np.testing.assert_allclose(lse.double().numpy(), ref_lse, atol=1e-4, rtol=1e-5)


def test_packed_numpy():
    specs = [Spec((4, 9, 9, 1), ("shared", "isolated", "isolated", "global")), Spec((12,), ("global",))]
    lens = [len(s) for s in specs]
    qs = [randn((2, n, 16), torch.float32, 70 + i).numpy() for i, n in enumerate(lens)]
    ks = [randn((1, n, 16), torch.float32, 80 + i).numpy() for i, n in enumerate(lens)]
    vs = [randn((1, n, 16), torch.float32, 90 + i).numpy() for i, n in enumerate(lens)]
    q, cu = pack([torch.from_numpy(x) for x in qs], lens)
    k, _ = pack([torch.from_numpy(x) for x in ks], lens)
    v, _ = pack([torch.from_numpy(x) for x in vs], lens)
    out = segflex.attention(q.numpy(), k.numpy(), v.numpy(), to_layouts(specs),
                            cu_seqlens_q=cu.numpy(), cu_seqlens_k=cu.numpy())
    ref, _ = reference_packed(q, k, v, specs, cu, cu)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------- biases


def test_biases_only_for_global_queries():
    """Changing the biases changes global rows and leaves all other rows alone."""
    lengths, kinds = (6, 12, 9, 11, 5), ("shared", "isolated", "isolated", "isolated", "global")
    plain = Spec(lengths, kinds)
    biased = Spec(lengths, kinds, (0.5, -2.0, -1.0, 1.0, 0.25))
    q, k, v = make_qkv([plain], 2, 1, 32, torch.float32, seed=30)
    a = segflex.attention(q, k, v, to_layouts([plain]))
    b = segflex.attention(q, k, v, to_layouts([biased]))
    glob = torch.zeros(len(plain), dtype=torch.bool)
    glob[-5:] = True
    torch.testing.assert_close(a[0, :, ~glob], b[0, :, ~glob], rtol=0, atol=0)
    assert (a[0, :, glob] - b[0, :, glob]).abs().max() > 1e-3
    check_padded(q, k, v, [biased], b)


def test_large_negative_bias_hides_segments():
    """A bias of -1e4 on the isolated segments makes global rows ignore them."""
    spec = Spec((4, 8, 8, 3), ("shared", "isolated", "isolated", "global"), (0.0, -1e4, -1e4, 0.0))
    q, k, v = make_qkv([spec], 1, 1, 16, torch.float32, seed=31)
    out = segflex.attention(q, k, v, to_layouts([spec]))
    keep = torch.zeros(23, dtype=torch.bool)
    keep[:4] = True
    keep[20:] = True
    for i in range(20, 23):
        vis = keep.clone()
        vis[i + 1:] = False
        s = (q[0, 0, i] @ k[0, 0, vis].T) / 4.0
        ref = torch.softmax(s.double(), -1) @ v[0, 0, vis].double()
        torch.testing.assert_close(out[0, 0, i].double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------- strided inputs


def test_transposed_views_bshd():
    """[B, L, H, D] tensors viewed as [B, H, L, D] (the transformers layout)."""
    specs = [ENSEMBLE, Spec((30, 20), ("isolated", "global"))]
    L = len(ENSEMBLE)
    g = torch.Generator().manual_seed(40)
    q = torch.randn(2, L, 4, 64, generator=g).transpose(1, 2)
    k = torch.randn(2, L, 2, 64, generator=g).transpose(1, 2)
    v = torch.randn(2, L, 2, 64, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    out = segflex.attention(q, k, v, to_layouts(specs))
    check_padded(q, k, v, specs, out)


def test_head_dim_not_contiguous_is_handled_or_rejected():
    specs = [ENSEMBLE]
    L = len(ENSEMBLE)
    g = torch.Generator().manual_seed(41)
    q = torch.randn(1, 2, 32, L, generator=g).transpose(2, 3)  # stride(-1) != 1
    k = torch.randn(1, 1, L, 32, generator=g)
    v = torch.randn(1, 1, L, 32, generator=g)
    try:
        out = segflex.attention(q, k, v, to_layouts(specs))
    except (ValueError, TypeError) as e:
        assert "q" in str(e)
    else:
        check_padded(q, k, v, specs, out)


def test_no_row_without_keys_in_valid_layouts():
    """Documented: the diagonal is always allowed, so only padding rows are empty."""
    for spec in [ENSEMBLE, Spec((1, 1, 1), ("isolated", "shared", "isolated"))]:
        m = spec_mask(spec)
        assert m.diagonal().all()
