"""segflex.build_block_mask against torch's create_block_mask on the oracle's mask.

The torch side never sees segflex: its mask_mod indexes a dense tensor built by
tests/oracle.py from the formula, so the two block masks come from independent
code and must agree block for block.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

import segflex
from conftest import to_layouts
from oracle import Spec, attention_reference, batches, block_summary, mask_from_formula

BLOCKS = st.sampled_from([16, 32, 64, 128])


def oracle_stack(specs, q_len, kv_len) -> np.ndarray:
    """``[B, q_len, kv_len]`` dense masks of a batch, one per layout."""
    return np.stack([mask_from_formula(s.lengths, s.kinds, q_len=q_len, kv_len=kv_len) for s in specs])


def oracle_mask_mod(dense: np.ndarray):
    """A FlexAttention mask_mod that reads the oracle's dense mask."""
    table = torch.from_numpy(dense)

    def mod(b, h, q_idx, kv_idx):
        return table[b, q_idx, kv_idx]

    return mod


def torch_block_mask(specs, q_len, kv_len, qb, kvb) -> BlockMask:
    dense = oracle_stack(specs, q_len, kv_len)
    return create_block_mask(oracle_mask_mod(dense), len(specs), None, q_len, kv_len,
                             device="cpu", BLOCK_SIZE=(qb, kvb))


def assert_same_blocks(ours, ref: BlockMask):
    """Every array of the FlexAttention block format, whole, equal."""
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        got = np.asarray(getattr(ours, name))
        want = getattr(ref, name).numpy()
        assert got.dtype == np.int32, f"{name} dtype {got.dtype}"
        assert got.shape == want.shape, f"{name} shape {got.shape} != {want.shape}"
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[:5].tolist()
            raise AssertionError(f"{name} differs at {bad}: got {got[tuple(bad[0])]}, "
                                 f"want {want[tuple(bad[0])]}")


@st.composite
def block_cases(draw, max_total=600, max_batch=4):
    specs = draw(batches(max_batch=max_batch, max_total=max_total, with_biases=False))
    longest = max(len(s) for s in specs)
    kv_len = longest + draw(st.one_of(st.just(0), st.integers(0, 70)))
    q_len = draw(st.one_of(st.just(kv_len), st.integers(1, kv_len)))
    qb, kvb = draw(BLOCKS), draw(BLOCKS)
    return specs, q_len, kv_len, qb, kvb


# ------------------------------------------------------------ block for block


@given(block_cases())
@settings(max_examples=220)
def test_block_mask_equals_create_block_mask(case):
    specs, q_len, kv_len, qb, kvb = case
    ours = segflex.build_block_mask(to_layouts(specs), q_len=q_len, kv_len=kv_len,
                                    q_block_size=qb, kv_block_size=kvb)
    assert_same_blocks(ours, torch_block_mask(specs, q_len, kv_len, qb, kvb))


@pytest.mark.slow
@given(block_cases(max_total=3000, max_batch=6))
@settings(max_examples=600)
def test_block_mask_equals_create_block_mask_big_sweep(case):
    specs, q_len, kv_len, qb, kvb = case
    ours = segflex.build_block_mask(to_layouts(specs), q_len=q_len, kv_len=kv_len,
                                    q_block_size=qb, kv_block_size=kvb)
    assert_same_blocks(ours, torch_block_mask(specs, q_len, kv_len, qb, kvb))


@pytest.mark.parametrize("specs,q_len,kv_len,qb,kvb", [
    # the seed's workload: 5 isolated paraphrases + global generated tail
    ([Spec((48, 47, 48, 49, 46, 10), ("isolated",) * 5 + ("global",))], None, None, 128, 128),
    ([Spec((48, 47, 48, 49, 46, 10), ("isolated",) * 5 + ("global",))], None, None, 16, 64),
    # one-token segments everywhere
    ([Spec((1,) * 70, ("isolated", "shared", "global", "isolated") * 17 + ("global", "global"))],
     None, None, 16, 16),
    # batch of different lengths; shorter sequences are masked past their end
    ([Spec((5, 100, 3), ("shared", "isolated", "global")), Spec((300,), ("global",)),
      Spec((1,), ("isolated",))], None, None, 32, 128),
    # chunked prefill: the last 40 queries of a 257-long axis
    ([Spec((17, 60, 60, 60, 60), ("shared",) + ("isolated",) * 4)], 40, 257, 32, 16),
    # a single query (decode-like)
    ([Spec((17, 60, 60), ("shared", "isolated", "global"))], 1, 137, 128, 32),
])
def test_block_mask_hand_cases(specs, q_len, kv_len, qb, kvb):
    ql = q_len if q_len is not None else max(len(s) for s in specs)
    kl = kv_len if kv_len is not None else max(len(s) for s in specs)
    ours = segflex.build_block_mask(to_layouts(specs), q_len=q_len, kv_len=kv_len,
                                    q_block_size=qb, kv_block_size=kvb)
    assert_same_blocks(ours, torch_block_mask(specs, ql, kl, qb, kvb))


@given(batches(max_batch=3, max_total=500, with_biases=False), BLOCKS)
@settings(max_examples=40)
def test_block_size_and_defaults(specs, block):
    """block_size sets both sizes; q_len and kv_len default to the longest layout."""
    L = max(len(s) for s in specs)
    ours = segflex.build_block_mask(to_layouts(specs), block_size=block)
    assert_same_blocks(ours, torch_block_mask(specs, L, L, block, block))


def test_default_block_size_is_128():
    specs = [Spec((100, 200, 3), ("shared", "isolated", "global"))]
    ours = segflex.build_block_mask(to_layouts(specs))
    assert_same_blocks(ours, torch_block_mask(specs, 303, 303, 128, 128))


def test_single_layout_accepted():
    spec = Spec((30, 40, 5), ("isolated", "isolated", "global"))
    ours = segflex.build_block_mask(to_layouts([spec])[0], block_size=16)
    assert_same_blocks(ours, torch_block_mask([spec], 75, 75, 16, 16))


# --------------------------------------------------------------------- to_flex


@given(block_cases(max_total=300, max_batch=3))
@settings(max_examples=25)
def test_to_flex_block_structure(case):
    specs, q_len, kv_len, qb, kvb = case
    ours = segflex.build_block_mask(to_layouts(specs), q_len=q_len, kv_len=kv_len,
                                    q_block_size=qb, kv_block_size=kvb)
    fb = ours.to_flex()
    assert isinstance(fb, BlockMask)
    assert tuple(fb.BLOCK_SIZE) == (qb, kvb)
    assert tuple(fb.seq_lengths) == (q_len, kv_len)
    assert_same_blocks(fb, torch_block_mask(specs, q_len, kv_len, qb, kvb))
    # to_dense() is derived from the indices alone: the blocks with any allowed pair
    dense = oracle_stack(specs, q_len, kv_len)
    want = np.stack([np.logical_or(*block_summary(d, qb, kvb)) for d in dense])
    np.testing.assert_array_equal(fb.to_dense()[:, 0].numpy().astype(bool), want)
    # and its mask_mod is the oracle's mask
    got = create_mask(fb.mask_mod, len(specs), 1, q_len, kv_len, device="cpu")[:, 0].numpy()
    np.testing.assert_array_equal(got, dense)


@given(block_cases(max_total=200, max_batch=3), st.sampled_from([(1, 1), (2, 1), (4, 2)]))
@settings(max_examples=20)
def test_to_flex_attention_matches_reference(case, heads):
    specs, q_len, kv_len, qb, kvb = case
    Hq, Hkv = heads
    B, D = len(specs), 16
    g = torch.Generator().manual_seed(len(specs) * 1000 + q_len)
    q = torch.randn(B, Hq, q_len, D, generator=g)
    k = torch.randn(B, Hkv, kv_len, D, generator=g)
    v = torch.randn(B, Hkv, kv_len, D, generator=g)
    fb = segflex.build_block_mask(to_layouts(specs), q_len=q_len, kv_len=kv_len,
                                  q_block_size=qb, kv_block_size=kvb).to_flex()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        out = flex_attention(q, k, v, block_mask=fb, enable_gqa=Hq != Hkv)
    dense = oracle_stack(specs, q_len, kv_len)
    for b in range(B):
        ref, _ = attention_reference(q[b], k[b], v[b], dense[b])
        np.testing.assert_allclose(out[b].numpy(), ref, atol=2e-5, rtol=1e-4)


# -------------------------------------------------------------------- mask_mod


@given(batches(max_batch=4, max_total=300, with_biases=False), st.data())
@settings(max_examples=60)
def test_mask_mod_equals_oracle(specs, data):
    L = max(len(s) for s in specs)
    kv_len = L + data.draw(st.integers(0, 20))
    q_len = data.draw(st.integers(1, kv_len))
    mod = segflex.mask_mod(to_layouts(specs), q_len=q_len, kv_len=kv_len)
    got = create_mask(mod, len(specs), 1, q_len, kv_len, device="cpu")[:, 0].numpy()
    np.testing.assert_array_equal(got, oracle_stack(specs, q_len, kv_len))


def test_mask_mod_defaults():
    specs = [Spec((3, 4, 2), ("shared", "isolated", "global")), Spec((6,), ("isolated",))]
    mod = segflex.mask_mod(to_layouts(specs))
    got = create_mask(mod, 2, 1, 9, 9, device="cpu")[:, 0].numpy()
    np.testing.assert_array_equal(got, oracle_stack(specs, 9, 9))


def test_mask_mod_drives_create_block_mask():
    """segflex.mask_mod through torch's own builder gives segflex's blocks."""
    specs = [Spec((20, 33, 33, 2), ("shared", "isolated", "isolated", "global")),
             Spec((50,), ("global",))]
    ours = segflex.build_block_mask(to_layouts(specs), block_size=16)
    ref = create_block_mask(segflex.mask_mod(to_layouts(specs)), 2, None, 88, 88, device="cpu",
                            BLOCK_SIZE=16)
    assert_same_blocks(ours, ref)
