"""SegmentLayout against the formula of DESIGN section 1 (tests/oracle.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import segflex
from conftest import to_layout
from oracle import (GLOBAL, ISOLATED, SHARED, Spec, aligned_positions_from_formula, layouts,
                    mask_from_formula, mask_from_formula_scalar, segment_ids_from_formula)


# ------------------------------------------------------------------ the oracle


@given(layouts(max_segments=8, max_length=6))
@settings(max_examples=60)
def test_oracle_vectorised_equals_scalar_formula(spec):
    """The broadcast oracle is the per-pair formula (guards the oracle itself)."""
    L = len(spec)
    for q_len, kv_len, seq_len in [(L, L, L), (max(1, L // 2), L + 3, L), (2, L + 4, L + 2)]:
        np.testing.assert_array_equal(
            mask_from_formula(spec.lengths, spec.kinds, q_len, kv_len, seq_len),
            mask_from_formula_scalar(spec.lengths, spec.kinds, q_len, kv_len, seq_len))


def test_oracle_hand_example():
    # [shared 2][isolated 2][isolated 1][global 2]
    m = mask_from_formula([2, 2, 1, 2], [SHARED, ISOLATED, ISOLATED, GLOBAL])
    expect = np.array([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # second paraphrase: prefix + itself only
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(m, expect)


# --------------------------------------------------------------- construction


def test_construction_and_accessors():
    lay = segflex.SegmentLayout(lengths=[5, 7, 6, 2], kinds=["shared", "isolated", "isolated", "global"])
    assert len(lay) == 20
    assert list(lay.lengths) == [5, 7, 6, 2]
    assert list(lay.kinds) == ["shared", "isolated", "isolated", "global"]
    assert lay.n_segments == 4
    assert [float(b) for b in lay.biases] == [0.0] * 4


def test_biases_are_kept():
    lay = segflex.SegmentLayout(lengths=[3, 4, 4, 1], kinds=["shared", "isolated", "isolated", "global"],
                                biases=[0.0, -math.log(2), -math.log(2), 0.0])
    np.testing.assert_allclose([float(b) for b in lay.biases], [0.0, -math.log(2), -math.log(2), 0.0],
                               rtol=1e-6)


def test_one_segment_and_one_token():
    lay = segflex.SegmentLayout(lengths=[1], kinds=["isolated"])
    assert len(lay) == 1
    np.testing.assert_array_equal(lay.dense_mask(), np.ones((1, 1), bool))


def test_len_and_repr():
    lay = segflex.SegmentLayout(lengths=[4, 3, 3, 1], kinds=["shared", "isolated", "isolated", "global"])
    assert len(lay) == 11
    r = repr(lay)
    assert "SegmentLayout" in r
    # readable: it mentions the kinds and the lengths, and is not a memory address only
    assert "shared" in r and "isolated" in r and "global" in r
    assert "4" in r and "3" in r
    assert "object at 0x" not in r
    # long layouts keep a bounded repr
    big = segflex.SegmentLayout(lengths=[2] * 1000, kinds=["isolated"] * 1000)
    assert len(repr(big)) < 2000


@given(layouts())
@settings(max_examples=100)
def test_segment_ids(spec):
    lay = to_layout(spec)
    ids = np.asarray(lay.segment_ids())
    assert ids.dtype == np.int32
    assert ids.shape == (len(spec),)
    np.testing.assert_array_equal(ids, segment_ids_from_formula(spec.lengths))


# ------------------------------------------------------------------ dense mask


@given(layouts(max_total=700))
@settings(max_examples=300)
def test_dense_mask_matches_formula(spec):
    lay = to_layout(spec)
    m = np.asarray(lay.dense_mask())
    assert m.dtype == np.bool_
    assert m.shape == (len(spec), len(spec))
    np.testing.assert_array_equal(m, mask_from_formula(spec.lengths, spec.kinds))


@given(layouts(max_total=400))
@settings(max_examples=100)
def test_dense_mask_has_no_orphan_rows(spec):
    """The diagonal is always allowed, so no row attends to nothing."""
    m = np.asarray(to_layout(spec).dense_mask())
    assert m.diagonal().all()
    assert m.any(axis=1).all()
    assert not np.triu(m, 1).any()  # causal


# ----------------------------------------------------------------- positions


def test_position_ids_contiguous_hand():
    lay = segflex.SegmentLayout(lengths=[2, 3, 1], kinds=["shared", "isolated", "global"])
    pos = np.asarray(lay.position_ids(mode="contiguous"))
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos, np.arange(6))


def test_position_ids_default_is_a_documented_mode():
    lay = segflex.SegmentLayout(lengths=[2, 3, 3], kinds=["shared", "isolated", "isolated"])
    pos = np.asarray(lay.position_ids())
    assert any(np.array_equal(pos, np.asarray(lay.position_ids(mode=m))) for m in ("contiguous", "aligned"))


@pytest.mark.parametrize("lengths,kinds,expect", [
    # shared prefix of 2, three isolated of 3, 1, 4; global cue of 2 continues after the longest (4)
    ([2, 3, 1, 4, 2], ["shared", "isolated", "isolated", "isolated", "global"],
     [0, 1, 2, 3, 4, 2, 2, 3, 4, 5, 6, 7]),
    # no prefix: the isolated run starts at 0
    ([3, 2, 1], ["isolated", "isolated", "global"], [0, 1, 2, 0, 1, 3]),
    # two separate runs, each aligned on its own
    ([1, 2, 3, 1, 2, 2], ["shared", "isolated", "isolated", "global", "isolated", "isolated"],
     [0, 1, 2, 1, 2, 3, 4, 5, 6, 5, 6]),
    # a single isolated segment is its own run: aligned == contiguous
    ([3, 4], ["shared", "isolated"], list(range(7))),
    # shared segments between isolated ones break the run
    ([2, 2, 2], ["isolated", "shared", "isolated"], list(range(6))),
])
def test_position_ids_aligned_hand(lengths, kinds, expect):
    lay = segflex.SegmentLayout(lengths=lengths, kinds=kinds)
    np.testing.assert_array_equal(np.asarray(lay.position_ids(mode="aligned")), expect)


@given(layouts())
@settings(max_examples=150)
def test_position_ids_properties(spec):
    lay = to_layout(spec)
    np.testing.assert_array_equal(np.asarray(lay.position_ids(mode="contiguous")), np.arange(len(spec)))
    pos = np.asarray(lay.position_ids(mode="aligned"))
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos, aligned_positions_from_formula(spec.lengths, spec.kinds))
    # properties, stated independently of the formula above
    starts = np.concatenate([[0], np.cumsum(spec.lengths)[:-1]])
    for s, (start, n) in enumerate(zip(starts, spec.lengths)):
        seg = pos[start:start + n]
        np.testing.assert_array_equal(np.diff(seg), np.ones(n - 1, np.int64))  # +1 inside a segment
        if s > 0 and not (spec.kinds[s] == ISOLATED and spec.kinds[s - 1] == ISOLATED):
            # a segment that does not continue a run follows the max position seen so far
            assert seg[0] == pos[:start].max() + 1
        if s > 0 and spec.kinds[s] == ISOLATED and spec.kinds[s - 1] == ISOLATED:
            assert seg[0] == pos[starts[s - 1]]  # same start as its neighbour in the run


def test_bad_position_mode():
    lay = segflex.SegmentLayout(lengths=[2], kinds=["global"])
    with pytest.raises(ValueError, match="mode"):
        lay.position_ids(mode="rope")


# ----------------------------------------------------------------- extended


@given(layouts(max_total=300), st.integers(0, 40))
@settings(max_examples=60)
def test_extended(spec, n):
    lay = to_layout(spec)
    ext = lay.extended(n)
    assert len(ext) == len(spec) + n
    assert len(lay) == len(spec)  # the original is unchanged
    np.testing.assert_array_equal(np.asarray(ext.dense_mask()),
                                  mask_from_formula(spec.lengths, spec.kinds, seq_len=len(spec) + n))
    if n > 0:
        assert ext.kinds[-1] == GLOBAL
        # the generated tokens carry no bias
        ids = np.asarray(ext.segment_ids())
        assert float(ext.biases[int(ids[-1])]) == 0.0
        # contiguous positions continue; aligned positions continue after the layout's max
        assert np.asarray(ext.position_ids(mode="contiguous"))[-1] == len(spec) + n - 1
        al = np.asarray(ext.position_ids(mode="aligned"))
        base = np.asarray(lay.position_ids(mode="aligned"))
        np.testing.assert_array_equal(al[:len(spec)], base)
        np.testing.assert_array_equal(al[len(spec):], base.max() + 1 + np.arange(n))


# --------------------------------------------------------------- from_tokens


def _span(lay, start, n):
    """Segment ids of positions [start, start+n)."""
    return np.asarray(lay.segment_ids())[start:start + n]


def test_from_tokens_boundaries_at_list_boundaries():
    bos = [1]
    prefix = bos + [11, 12, 13, 14]               # BOS + instruction + "Q: "
    paraphrases = [[21, 22, 23], [31], [41, 42, 43, 44, 45]]
    cue = [51, 52]
    lay = segflex.SegmentLayout.from_tokens(prefix=prefix, paraphrases=paraphrases, answer_cue=cue)
    assert list(lay.lengths) == [5, 3, 1, 5, 2]
    assert list(lay.kinds) == ["shared", "isolated", "isolated", "isolated", "global"]
    assert len(lay) == len(prefix) + sum(map(len, paraphrases)) + len(cue)
    # the BOS is in the shared prefix: every paraphrase sees it, exactly once
    m = np.asarray(lay.dense_mask())
    starts = np.cumsum([0] + list(lay.lengths))
    for s in range(1, 4):
        assert m[starts[s]:starts[s + 1], 0].all()
    # each paraphrase's tokens form exactly one segment
    for s, p in enumerate(paraphrases, start=1):
        ids = _span(lay, starts[s], len(p))
        assert (ids == ids[0]).all()
    assert len(set(np.asarray(lay.segment_ids()).tolist())) == 5


def test_from_tokens_bias():
    lay = segflex.SegmentLayout.from_tokens(prefix=[1, 2], paraphrases=[[3], [4, 5], [6]], answer_cue=[7],
                                            paraphrase_bias=-math.log(3))
    np.testing.assert_allclose([float(b) for b in lay.biases],
                               [0.0, -math.log(3), -math.log(3), -math.log(3), 0.0], rtol=1e-6)


@given(st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=30), min_size=1, max_size=8),
       st.lists(st.integers(0, 1000), min_size=1, max_size=20),
       st.lists(st.integers(0, 1000), min_size=1, max_size=4))
@settings(max_examples=50)
def test_from_tokens_lengths_equal_lists(paraphrases, prefix, cue):
    lay = segflex.SegmentLayout.from_tokens(prefix=prefix, paraphrases=paraphrases, answer_cue=cue)
    assert list(lay.lengths) == [len(prefix)] + [len(p) for p in paraphrases] + [len(cue)]
    spec = Spec(tuple(lay.lengths), tuple(lay.kinds))
    np.testing.assert_array_equal(np.asarray(lay.dense_mask()), mask_from_formula(spec.lengths, spec.kinds))


def test_from_tokens_empty_prefix_and_cue_make_no_empty_segment():
    lay = segflex.SegmentLayout.from_tokens(prefix=[], paraphrases=[[1, 2], [3]], answer_cue=[])
    assert all(int(n) > 0 for n in lay.lengths)
    assert len(lay) == 3
    assert sum(k == "isolated" for k in lay.kinds) == 2


# --------------------------------------------------------------- seed_format


@pytest.mark.parametrize("generated", [0, 1, 7])
def test_seed_format_no_orphans(generated):
    prompts = [[1, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40], [1, 50, 51, 52]]
    sep = [900, 901, 902]
    lay = segflex.SegmentLayout.seed_format(prompts=prompts, separator=sep, generated=generated)
    total = sum(map(len, prompts)) + generated
    # separators between (or after) prompts; they are inside segments, not dropped
    assert len(lay) in (total + (len(prompts) - 1) * len(sep), total + len(prompts) * len(sep))
    assert sum(int(n) for n in lay.lengths) == len(lay)
    ids = np.asarray(lay.segment_ids())
    assert ids.min() >= 0 and ids.max() < lay.n_segments  # no position outside a segment
    m = np.asarray(lay.dense_mask())
    assert m.diagonal().all()  # every row (separator rows too) attends at least to itself
    kinds = list(lay.kinds)
    assert kinds.count("isolated") == len(prompts)
    if generated:
        assert kinds[-1] == "global" and int(lay.lengths[-1]) == generated
        # generated tokens see every earlier token
        assert m[-generated:, :].sum() == sum(len(lay) - generated + i + 1 for i in range(generated))
    else:
        assert "global" not in kinds
    # each prompt's tokens lie inside one isolated segment, in order; the
    # concatenation is p0 sep p1 sep ... (a trailing separator changes nothing here)
    iso = [s for s, k in enumerate(kinds) if k == "isolated"]
    pos = 0
    for i, p in enumerate(prompts):
        segs = set(ids[pos:pos + len(p)].tolist())
        assert segs == {iso[i]}, f"prompt {i} spans segments {segs}"
        pos += len(p) + len(sep)


def test_seed_format_mask_is_the_formula():
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    lay = segflex.SegmentLayout.seed_format(prompts=prompts, separator=[0], generated=3)
    np.testing.assert_array_equal(np.asarray(lay.dense_mask()),
                                  mask_from_formula(list(lay.lengths), list(lay.kinds)))
