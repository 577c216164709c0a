"""segflex.decode on CPU against the float64 reference.

The new tokens are global: each attends causally to the whole valid cache,
plus the bias of each key's segment (keys past the layout: bias 0). The error
rule is the one of test_attention_cpu (2x SDPA's error + a floor).
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
from oracle import GLOBAL, Spec, attention_reference, layouts, mask_from_formula, spec_bias


def decode_reference(q, k, v, spec, n, scale):
    """One sequence: q ``[Hq, Q, D]`` at positions n-Q..n-1, cache ``[Hkv, S, D]``
    with n valid rows. Every query is global: the layout only gives biases."""
    Q, S = q.shape[1], k.shape[1]
    if spec is None:
        spec = Spec((n,), (GLOBAL,))
    glob = Spec(spec.lengths, (GLOBAL,) * spec.n_segments, spec.biases)
    # rows: the Q positions ending at n; columns: the whole S-long cache
    mask = mask_from_formula(glob.lengths, glob.kinds, q_len=Q, kv_len=n, seq_len=n)
    bias = spec_bias(glob, q_len=Q, kv_len=n, seq_len=n)
    full_mask = np.zeros((Q, S), bool)
    full_bias = np.zeros((Q, S))
    full_mask[:, :n] = mask
    full_bias[:, :n] = bias
    return full_mask, full_bias


def check_decode(q, kc, vc, lens, specs, out, lse=None, scale=None):
    B, Hq, Q, D = q.shape
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    ours_err = peer_err = 0.0
    for b in range(B):
        spec = None if specs is None else specs[b]
        mask, bias = decode_reference(q[b], kc[b], vc[b], spec, int(lens[b]), sc)
        ref, ref_lse = attention_reference(q[b], kc[b], vc[b], mask, bias, sc)
        got = np.asarray(out[b].float() if isinstance(out, torch.Tensor) else out[b], np.float64)
        ours_err = max(ours_err, float(np.abs(got - ref).max()))
        peer = sdpa_rows(q[b], kc[b], vc[b], mask, bias, sc).double().numpy()
        peer_err = max(peer_err, float(np.abs(peer - ref).max()))
        if lse is not None:
            np.testing.assert_allclose(np.asarray(lse[b], np.float64), ref_lse,
                                       atol=LSE_TOL[q.dtype], rtol=1e-5)
    assert ours_err <= 2 * peer_err + FLOOR[q.dtype], \
        f"max abs error {ours_err:.3g} > 2 x SDPA's {peer_err:.3g} + floor"


@st.composite
def decode_cases(draw, max_len=4096):
    B = draw(st.integers(1, 3))
    Q = draw(st.integers(1, 8))
    lens = [draw(st.one_of(st.integers(Q, Q + 5), st.integers(Q, max_len))) for _ in range(B)]
    S = max(lens) + draw(st.integers(0, 33))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    Hkv = draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([16, 64, 128]))
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    use_layouts = draw(st.booleans())
    specs = None
    if use_layouts:
        # layouts shorter than (or as long as) the cache before the new tokens
        specs = [draw(layouts(max_total=max(1, n - Q), with_biases=True)) if n > Q
                 else None for n in lens]
        if any(s is None for s in specs):  # a cache holding only new tokens: no layout room
            specs = None
    return lens, S, Q, Hkv * group, Hkv, D, dtype, specs


@given(decode_cases())
@settings(max_examples=40)
def test_decode_matches_reference(case):
    lens, S, Q, Hq, Hkv, D, dtype, specs = case
    B = len(lens)
    q = randn((B, Hq, Q, D), dtype, S)
    kc = randn((B, Hkv, S, D), dtype, S + 1)
    vc = randn((B, Hkv, S, D), dtype, S + 2)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out, lse = segflex.decode(q, kc, vc, lens_t, layouts=None if specs is None else to_layouts(specs),
                              return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, Hq, Q) and lse.dtype == torch.float32
    check_decode(q, kc, vc, lens, specs, out, lse)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("Q", [1, 3, 8])
def test_decode_batch_of_different_lengths(Q, dtype):
    lens = [Q, 37, 4096, 1000]
    specs = [None, Spec((10, 10, 9), ("shared", "isolated", "isolated"), (0.0, -0.7, -0.7)),
             Spec((100,) * 5 + (3,), ("isolated",) * 5 + ("global",), (-math.log(5),) * 5 + (0.0,)),
             Spec((1, 500), ("global", "isolated"), (2.0, -1.0))]
    B, Hq, Hkv, D, S = 4, 8, 2, 64, 4096 + 16
    q = randn((B, Hq, Q, D), dtype, 1)
    kc = randn((B, Hkv, S, D), dtype, 2)
    vc = randn((B, Hkv, S, D), dtype, 3)
    lay = [segflex.SegmentLayout(lengths=[Q], kinds=["global"])] + to_layouts(specs[1:])
    ref_specs = [Spec((Q,), ("global",))] + specs[1:]
    out, lse = segflex.decode(q, kc, vc, lens, layouts=lay, return_lse=True)
    check_decode(q, kc, vc, lens, ref_specs, out, lse)


def test_decode_queries_inside_the_layout_are_still_global():
    """A layout may reach into the new tokens (it only has to fit the cache):
    the new tokens are global all the same, only the keys' biases apply."""
    B, Hq, Hkv, Q, D, S = 1, 2, 1, 4, 32, 40
    q, kc, vc = (randn((B, Hq, Q, D), torch.float32, 50), randn((B, Hkv, S, D), torch.float32, 51),
                 randn((B, Hkv, S, D), torch.float32, 52))
    spec = Spec((10, 14, 14), ("shared", "isolated", "isolated"), (0.0, -0.5, 0.3))  # covers 24..37
    out, lse = segflex.decode(q, kc, vc, [38], layouts=to_layouts([spec]), return_lse=True)
    check_decode(q, kc, vc, [38], [spec], out, lse)


def test_decode_without_layouts_is_causal_over_cache():
    B, Hq, Hkv, Q, D, S = 2, 4, 4, 2, 32, 50
    q, kc, vc = randn((B, Hq, Q, D), torch.float32, 5), randn((B, Hkv, S, D), torch.float32, 6), \
        randn((B, Hkv, S, D), torch.float32, 7)
    lens = np.array([50, 9], dtype=np.int64)
    out = segflex.decode(q, kc, vc, lens)
    check_decode(q, kc, vc, lens, None, out)
    # garbage past a cache's valid length must not matter
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[1, :, 9:] = 1e4
    vc2[1, :, 9:] = float("nan")
    out2 = segflex.decode(q, kc2, vc2, lens)
    torch.testing.assert_close(out2[1], out[1], rtol=0, atol=0)


def test_decode_numpy():
    B, Hq, Hkv, Q, D, S = 2, 4, 2, 1, 64, 300
    q, kc, vc = (randn((B, Hq, Q, D), torch.float32, 8), randn((B, Hkv, S, D), torch.float32, 9),
                 randn((B, Hkv, S, D), torch.float32, 10))
    specs = [Spec((100, 100), ("isolated", "isolated"), (-0.5, -0.5)), Spec((3,), ("shared",), (1.0,))]
    lens = [300, 17]
    out, lse = segflex.decode(q.numpy(), kc.numpy(), vc.numpy(), np.array(lens), layouts=to_layouts(specs),
                              return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    check_decode(q, kc, vc, lens, specs, out, lse)


# ------------------------------------------------- equal to attention's rows


@st.composite
def consistency_cases(draw):
    B = draw(st.integers(1, 3))
    Q = draw(st.integers(1, 8))
    specs = [draw(layouts(max_total=400, with_biases=True)) for _ in range(B)]
    gens = [draw(st.integers(Q, Q + 20)) for _ in range(B)]  # generated tokens incl. the new ones
    group = draw(st.sampled_from([1, 2, 4]))
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    return specs, gens, Q, group, dtype


@given(consistency_cases())
@settings(max_examples=30)
def test_decode_equals_attention_last_rows(case):
    """decode == attention on the whole sequence with the layout extended by
    the generated tokens, last Q rows (both within the error rule)."""
    specs, gens, Q, group, dtype = case
    B, Hkv, D = len(specs), 2, 64
    Hq = Hkv * group
    lens = [len(s) + g for s, g in zip(specs, gens)]
    S = max(lens)
    seed = S * 7 + Q
    kc = randn((B, Hkv, S, D), dtype, seed)
    vc = randn((B, Hkv, S, D), dtype, seed + 1)
    qfull = randn((B, Hq, S, D), dtype, seed + 2)
    # the decode queries: rows n-Q..n-1 of each sequence's full query matrix
    q = torch.stack([qfull[b, :, n - Q:n] for b, n in enumerate(lens)])
    out_d = segflex.decode(q, kc, vc, torch.tensor(lens), layouts=to_layouts(specs))
    ext = [lay.extended(g) for lay, g in zip(to_layouts(specs), gens)]
    out_a = segflex.attention(qfull, kc, vc, ext)
    ref_specs = [s.extended(g) for s, g in zip(specs, gens)]
    for b, n in enumerate(lens):
        last = out_a[b, :, n - Q:n]
        # both against the same reference rows
        check_decode(q[b:b + 1], kc[b:b + 1], vc[b:b + 1], [n], [specs[b]], out_d[b:b + 1])
        check_decode(q[b:b + 1], kc[b:b + 1], vc[b:b + 1], [n], [ref_specs[b]], last[None])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out_d[b].float(), last.float(), atol=tol, rtol=tol)
