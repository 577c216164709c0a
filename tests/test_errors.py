"""Every bad input raises ValueError/TypeError naming the bad argument.

Each case runs in this process: a crash in the C core would take the test run
down with it, so "nothing segfaults" is checked by the run completing.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import segflex

LAY = segflex.SegmentLayout(lengths=[3, 4, 1], kinds=["shared", "isolated", "global"])


def named(name: str) -> str:
    """Regex: the argument's name as a word (``q``, ``cu_seqlens_k``, ``lengths[0]``)."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


def qkv(B=1, Hq=2, Hkv=1, L=8, D=16, dtype=torch.float32, Lq=None):
    g = torch.Generator().manual_seed(0)
    Lq = L if Lq is None else Lq
    return (torch.randn(B, Hq, Lq, D, generator=g).to(dtype), torch.randn(B, Hkv, L, D, generator=g).to(dtype),
            torch.randn(B, Hkv, L, D, generator=g).to(dtype))


# ------------------------------------------------------------------- layouts


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(lengths=[], kinds=[]), ValueError, "lengths"),
    (dict(lengths=[0], kinds=["shared"]), ValueError, "lengths"),
    (dict(lengths=[3, -1], kinds=["shared", "global"]), ValueError, "lengths"),
    (dict(lengths=[1.5], kinds=["shared"]), TypeError, "lengths"),
    (dict(lengths=["3"], kinds=["shared"]), TypeError, "lengths"),
    (dict(lengths=3, kinds=["shared"]), TypeError, "lengths"),
    (dict(lengths=[3], kinds=["private"]), ValueError, "kinds"),
    (dict(lengths=[3, 2], kinds=["shared"]), ValueError, "kinds"),
    (dict(lengths=[3], kinds=[None]), (ValueError, TypeError), "kinds"),
    (dict(lengths=[3], kinds=["shared"], biases=[float("nan")]), ValueError, "biases"),
    (dict(lengths=[3], kinds=["shared"], biases=[float("inf")]), ValueError, "biases"),
    (dict(lengths=[3], kinds=["shared"], biases=[-float("inf")]), ValueError, "biases"),
    (dict(lengths=[3], kinds=["shared"], biases=[0.0, 1.0]), ValueError, "biases"),
    (dict(lengths=[3], kinds=["shared"], biases=["x"]), TypeError, "biases"),
])
def test_bad_layouts(kwargs, exc, name):
    with pytest.raises(exc, match=named(name)):
        segflex.SegmentLayout(**kwargs)


def test_bad_from_tokens_and_seed_format():
    with pytest.raises(ValueError, match=named("paraphrases")):
        segflex.SegmentLayout.from_tokens(prefix=[1], paraphrases=[], answer_cue=[2])
    with pytest.raises(ValueError, match=named("paraphrases")):
        segflex.SegmentLayout.from_tokens(prefix=[1], paraphrases=[[3], []], answer_cue=[2])
    with pytest.raises(TypeError, match=named("prefix")):
        segflex.SegmentLayout.from_tokens(prefix="hello", paraphrases=[[3]], answer_cue=[2])
    with pytest.raises(ValueError, match=named("prompts")):
        segflex.SegmentLayout.seed_format(prompts=[], separator=[1])
    with pytest.raises(ValueError, match=named("generated")):
        segflex.SegmentLayout.seed_format(prompts=[[1]], separator=[1], generated=-1)


def test_bad_extended_and_mode():
    with pytest.raises(ValueError, match=named("n")):
        LAY.extended(-1)
    with pytest.raises((ValueError, TypeError), match=named("n")):
        LAY.extended(1.5)
    with pytest.raises(ValueError, match=named("mode")):
        LAY.position_ids(mode="absolute")


# --------------------------------------------------------------- block masks


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=-16), ValueError, "block_size"),
    (dict(block_size=48), ValueError, "block_size"),
    (dict(block_size=100), ValueError, "block_size"),
    (dict(block_size=16.0), TypeError, "block_size"),
    (dict(q_block_size=24), ValueError, "q_block_size"),
    (dict(kv_block_size=96), ValueError, "kv_block_size"),
    (dict(q_len=9, kv_len=8), ValueError, "q_len"),
    (dict(q_len=0, kv_len=8), ValueError, "q_len"),
    (dict(kv_len=5), ValueError, "kv_len"),
    (dict(q_len=2.0), TypeError, "q_len"),
])
def test_bad_block_mask_args(kwargs, exc, name):
    with pytest.raises(exc, match=named(name)):
        segflex.build_block_mask([LAY], **kwargs)


@pytest.mark.parametrize("layouts,exc", [([], ValueError), ([1, 2], TypeError), ("abc", TypeError),
                                         (None, TypeError)])
def test_bad_block_mask_layouts(layouts, exc):
    with pytest.raises(exc, match=named("layouts")):
        segflex.build_block_mask(layouts)


def test_bad_mask_mod_args():
    with pytest.raises(ValueError, match=named("q_len")):
        segflex.mask_mod([LAY], q_len=10, kv_len=8)
    with pytest.raises(ValueError, match=named("kv_len")):
        segflex.mask_mod([LAY], kv_len=4)
    with pytest.raises((ValueError, TypeError), match=named("layouts")):
        segflex.mask_mod([])


# ----------------------------------------------------------------- attention


def test_heads_not_multiple():
    q, k, v = qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"(?i)heads"):
        segflex.attention(q, k, v, [LAY])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_bad_torch_dtypes(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=named("q")):
        segflex.attention(q.to(dtype), k.to(dtype), v.to(dtype), [LAY])


def test_mixed_dtypes_and_types():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=named("k")):
        segflex.attention(q, k.to(torch.bfloat16), v, [LAY])
    with pytest.raises(TypeError, match=named("v")):
        segflex.attention(q, k, v.to(torch.float16), [LAY])
    with pytest.raises(TypeError, match=named("k")):
        segflex.attention(q, k.numpy(), v, [LAY])
    with pytest.raises(TypeError, match=named("q")):
        segflex.attention(q.tolist(), k, v, [LAY])


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_bad_numpy_dtypes(dtype):
    q, k, v = (t.numpy().astype(dtype) for t in qkv())
    with pytest.raises(TypeError, match=named("q")):
        segflex.attention(q, k, v, [LAY])


def test_wrong_and_mismatched_devices():
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError), match=named("q")):
        segflex.attention(q.to("meta"), k.to("meta"), v.to("meta"), [LAY])
    with pytest.raises((ValueError, TypeError), match=named("k")):
        segflex.attention(q, k.to("meta"), v, [LAY])


def test_shapes_not_matching():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=named("v")):
        segflex.attention(q, k, v[:, :, :5], [LAY])
    with pytest.raises(ValueError, match=named("k")):
        segflex.attention(q, k[..., :8], v[..., :8], [LAY])
    with pytest.raises(ValueError, match=named("q")):
        segflex.attention(q[0], k[0], v[0], [LAY])  # 3-D without cu_seqlens
    with pytest.raises(ValueError, match=r"(?i)\blayouts?\b|\bbatch\b"):
        segflex.attention(q, k, v, [LAY, LAY])      # 2 layouts, batch 1
    # a layout longer than the key axis
    q2, k2, v2 = qkv(L=6)
    with pytest.raises(ValueError, match=r"(?i)\blayouts?\b|\bk\b"):
        segflex.attention(q2, k2, v2, [LAY])


def test_q_len_longer_than_kv_len():
    q, k, v = qkv(L=8, Lq=9)
    with pytest.raises(ValueError, match=named("q")):
        segflex.attention(q, k, v, [LAY])


def test_head_dim_too_large_on_cpu():
    q, k, v = qkv(D=257)
    with pytest.raises(ValueError, match=r"(?i)head dim"):
        segflex.attention(q, k, v, [LAY])


def test_non_contiguous_head_dim_rejected_or_handled():
    q, k, v = qkv(L=8, D=16)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert qt.stride(-1) != 1
    try:
        out = segflex.attention(qt, k, v, [LAY])
    except ValueError as e:
        assert re.search(named("q"), str(e))
    else:
        torch.testing.assert_close(out, segflex.attention(q, k, v, [LAY]))


@pytest.mark.parametrize("scale,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                       ("0.5", TypeError)])
def test_bad_scale(scale, exc):
    q, k, v = qkv()
    with pytest.raises(exc, match=named("scale")):
        segflex.attention(q, k, v, [LAY], scale=scale)


def test_bad_layouts_argument():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=named("layouts")):
        segflex.attention(q, k, v, [[3, 4, 1]])
    with pytest.raises(ValueError, match=named("layouts")):
        segflex.attention(q, k, v, [])


# ---------------------------------------------------------------- cu_seqlens


def packed(total_q=8, total_k=8, Hq=2, Hkv=1, D=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(total_q, Hq, D, generator=g), torch.randn(total_k, Hkv, D, generator=g),
            torch.randn(total_k, Hkv, D, generator=g))


def test_cu_seqlens_not_matching():
    q, k, v = packed()
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens"):
        segflex.attention(q, k, v, [LAY], cu_seqlens_q=cu)  # only one of the pair
    with pytest.raises(ValueError, match=named("cu_seqlens_q")):
        segflex.attention(q, k, v, [LAY], cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32),
                          cu_seqlens_k=cu)  # past the end of q
    with pytest.raises(ValueError, match=named("cu_seqlens_k")):
        segflex.attention(q, k, v, [LAY], cu_seqlens_q=cu,
                          cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens"):
        segflex.attention(q, k, v, [LAY], cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32))  # 2 seqs, 1 layout
    with pytest.raises(ValueError, match=named("cu_seqlens_q")):
        segflex.attention(q, k, v, [LAY, LAY], cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, 8, 16], dtype=torch.int32))  # decreasing
    with pytest.raises(TypeError, match=named("cu_seqlens_q")):
        segflex.attention(q, k, v, [LAY], cu_seqlens_q=torch.tensor([0.0, 8.0]), cu_seqlens_k=cu)


def test_cu_seqlens_k_not_matching_layout():
    q, k, v = packed(total_q=6, total_k=6)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=named("cu_seqlens_k")):
        segflex.attention(q, k, v, [LAY], cu_seqlens_q=cu, cu_seqlens_k=cu)  # layout has 8 tokens


def test_packed_more_queries_than_keys():
    q, k, v = packed(total_q=10, total_k=8)
    with pytest.raises(ValueError, match=named("cu_seqlens_q")):
        segflex.attention(q, k, v, [LAY], cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32))


# -------------------------------------------------------------------- decode


def cache(B=1, Hq=2, Hkv=1, Q=1, S=16, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(B, Hq, Q, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype),
            torch.randn(B, Hkv, S, D, generator=g).to(dtype))


def test_bad_decode_args():
    q, kc, vc = cache()
    with pytest.raises(ValueError, match=named("cache_lens")):
        segflex.decode(q, kc, vc, [17])           # longer than the cache
    with pytest.raises(ValueError, match=named("cache_lens")):
        segflex.decode(q, kc, vc, [0])            # the new token must be in the cache
    with pytest.raises(ValueError, match=named("cache_lens")):
        segflex.decode(q, kc, vc, [5, 5])         # one per sequence
    with pytest.raises(TypeError, match=named("cache_lens")):
        segflex.decode(q, kc, vc, torch.tensor([5.0]))
    with pytest.raises(ValueError, match=named("v_cache")):
        segflex.decode(q, kc, vc[:, :, :8], [5])
    with pytest.raises(ValueError, match=named("k_cache")):
        segflex.decode(q, kc.expand(2, -1, -1, -1), vc.expand(2, -1, -1, -1), [5, 5])
    with pytest.raises(ValueError, match=named("layouts")):
        segflex.decode(q, kc, vc, [5], layouts=[LAY, LAY])
    with pytest.raises(ValueError, match=r"(?i)\blayouts?\b|\bcache_lens\b"):
        segflex.decode(q, kc, vc, [5], layouts=[LAY])   # layout (8) longer than the cache (5)
    with pytest.raises(TypeError, match=named("q")):
        segflex.decode(q.double(), kc.double(), vc.double(), [5])
    with pytest.raises(ValueError, match=r"(?i)heads"):
        q3, kc2, vc2 = cache(Hq=3, Hkv=2)
        segflex.decode(q3, kc2, vc2, [5])


def test_too_many_new_tokens():
    q, kc, vc = cache(Q=9)
    with pytest.raises(ValueError, match=named("q")):
        segflex.decode(q, kc, vc, [12])


# -------------------------------------------------------------------- views


def test_show_and_save_png_reject_non_layouts(tmp_path):
    with pytest.raises(TypeError, match=named("layout")):
        segflex.show([3, 4])
    with pytest.raises(TypeError, match=named("layout")):
        segflex.save_png("layout", tmp_path / "x.png")
