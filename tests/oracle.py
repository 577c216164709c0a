"""The slow, obvious reference that every fast path of segflex is tested against.

Nothing here imports segflex. The mask is evaluated element by element from the
formula of DESIGN section 1,

    mask(q, k) = k <= q and (kind(seg(q)) == global or seg(k) == seg(q)
                             or kind(seg(k)) == shared)

and attention is computed in float64 from that dense mask. The conventions are
those of the segflex contract:

* query row ``i`` of a ``q_len`` query axis sits at position
  ``i + (kv_len - q_len)``;
* a sequence has ``seq_len`` valid positions (by default its layout's length);
  positions at or past ``seq_len`` are masked out, rows and columns;
* positions in ``[layout length, seq_len)`` (a KV cache that grew during
  generation) belong to an implicit trailing global segment with bias 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

try:  # the reference itself works without torch (NumPy only)
    import torch
except ImportError:  # pragma: no cover - exercised only in torch-less checks
    torch = None

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

SHARED, ISOLATED, GLOBAL = "shared", "isolated", "global"
KINDS = (SHARED, ISOLATED, GLOBAL)


# --------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Spec:
    """A layout written down as plain lists (independent of segflex)."""

    lengths: tuple
    kinds: tuple
    biases: Optional[tuple] = None

    def __len__(self) -> int:
        return int(sum(self.lengths))

    @property
    def n_segments(self) -> int:
        return len(self.lengths)

    def bias_list(self) -> list:
        return list(self.biases) if self.biases is not None else [0.0] * len(self.lengths)

    def extended(self, n: int) -> "Spec":
        """The same layout followed by ``n`` generated (global, bias 0) tokens."""
        if n == 0:
            return self
        return Spec(self.lengths + (n,), self.kinds + (GLOBAL,), tuple(self.bias_list()) + (0.0,))


def segment_of(lengths: Sequence[int], pos: int) -> int:
    """Index of the segment holding ``pos``; ``len(lengths)`` for the implicit tail."""
    end = 0
    for s, n in enumerate(lengths):
        end += n
        if pos < end:
            return s
    return len(lengths)


def _seg_table(lengths, kinds, biases, seq_len):
    """Per-position (segment index, kind, bias) lists for positions 0..seq_len-1."""
    n_seg = len(lengths)
    biases = list(biases) if biases is not None else [0.0] * n_seg
    segs = np.repeat(np.arange(n_seg), lengths).tolist()[:seq_len]
    tail = seq_len - len(segs)
    segs += [n_seg] * tail  # implicit global tail of a cache longer than the layout
    ks = [kinds[s] if s < n_seg else GLOBAL for s in segs]
    bs = [float(biases[s]) if s < n_seg else 0.0 for s in segs]
    return segs, ks, bs


def allowed(lengths, kinds, q: int, k: int) -> bool:
    """The formula of DESIGN section 1 for one pair of positions."""
    if k > q:
        return False
    sq, sk = segment_of(lengths, q), segment_of(lengths, k)
    kq = kinds[sq] if sq < len(kinds) else GLOBAL
    kk = kinds[sk] if sk < len(kinds) else GLOBAL
    return kq == GLOBAL or sq == sk or kk == SHARED


def mask_from_formula(
    lengths: Sequence[int],
    kinds: Sequence[str],
    q_len: Optional[int] = None,
    kv_len: Optional[int] = None,
    seq_len: Optional[int] = None,
) -> np.ndarray:
    """Dense bool mask ``[q_len, kv_len]``: the formula evaluated for every pair.

    ``seq_len`` (default: the layout's length) is the number of valid
    positions; positions past the layout but before ``seq_len`` form the
    implicit global tail, positions at or past ``seq_len`` are masked.
    The formula is broadcast over all pairs with NumPy (one element per pair,
    no cleverness); ``allowed()`` is the scalar spelling of the same thing.
    """
    L = int(sum(lengths))
    seq_len = L if seq_len is None else int(seq_len)
    kv_len = seq_len if kv_len is None else int(kv_len)
    q_len = kv_len if q_len is None else int(q_len)
    segs, ks, _ = _seg_table(lengths, kinds, None, seq_len)
    n = max(seq_len, kv_len, 1)
    seg = np.full(n, -1, dtype=np.int64)
    is_global = np.zeros(n, dtype=bool)
    is_shared = np.zeros(n, dtype=bool)
    seg[:seq_len] = segs
    is_global[:seq_len] = [kd == GLOBAL for kd in ks]
    is_shared[:seq_len] = [kd == SHARED for kd in ks]
    qpos = np.arange(q_len) + (kv_len - q_len)        # position of each query row
    kpos = np.arange(kv_len)
    qp = np.clip(qpos, 0, n - 1)
    kp = np.clip(kpos, 0, n - 1)
    rule = (is_global[qp][:, None]
            | (seg[kp][None, :] == seg[qp][:, None])
            | is_shared[kp][None, :])
    causal = kpos[None, :] <= qpos[:, None]
    valid = ((qpos >= 0) & (qpos < seq_len))[:, None] & (kpos < seq_len)[None, :]
    return rule & causal & valid


def mask_from_formula_scalar(lengths, kinds, q_len=None, kv_len=None, seq_len=None) -> np.ndarray:
    """The same mask from ``allowed()`` pair by pair (slow; checks the above)."""
    L = int(sum(lengths))
    seq_len = L if seq_len is None else int(seq_len)
    kv_len = seq_len if kv_len is None else int(kv_len)
    q_len = kv_len if q_len is None else int(q_len)
    out = np.zeros((q_len, kv_len), dtype=bool)
    for i in range(q_len):
        p = i + kv_len - q_len
        for k in range(kv_len):
            out[i, k] = 0 <= p < seq_len and k < seq_len and allowed(lengths, kinds, p, k)
    return out


def bias_from_formula(
    lengths: Sequence[int],
    kinds: Sequence[str],
    biases: Optional[Sequence[float]],
    q_len: Optional[int] = None,
    kv_len: Optional[int] = None,
    seq_len: Optional[int] = None,
) -> np.ndarray:
    """Additive score bias ``[q_len, kv_len]`` (float64): ``bias(seg(k))`` for
    global queries, 0 elsewhere (masked pairs included; the mask decides)."""
    L = int(sum(lengths))
    seq_len = L if seq_len is None else int(seq_len)
    kv_len = seq_len if kv_len is None else int(kv_len)
    q_len = kv_len if q_len is None else int(q_len)
    _, ks, bs = _seg_table(lengths, kinds, biases, seq_len)
    out = np.zeros((q_len, kv_len), dtype=np.float64)
    offset = kv_len - q_len
    for i in range(q_len):
        p = i + offset
        if 0 <= p < seq_len and ks[p] == GLOBAL:
            n = min(kv_len, seq_len)
            out[i, :n] = bs[:n]
    return out


def spec_mask(spec: Spec, **kw) -> np.ndarray:
    return mask_from_formula(spec.lengths, spec.kinds, **kw)


def spec_bias(spec: Spec, **kw) -> np.ndarray:
    return bias_from_formula(spec.lengths, spec.kinds, spec.biases, **kw)


def segment_ids_from_formula(lengths: Sequence[int], length: Optional[int] = None) -> np.ndarray:
    n = int(sum(lengths)) if length is None else length
    return np.array([segment_of(lengths, p) for p in range(n)], dtype=np.int64)


def aligned_positions_from_formula(lengths: Sequence[int], kinds: Sequence[str]) -> np.ndarray:
    """Aligned position ids: each maximal run of isolated segments starts all of
    its segments at the same position; what follows continues after the longest."""
    out = []
    pos = 0
    s = 0
    while s < len(lengths):
        if kinds[s] == ISOLATED:
            run_end = s
            while run_end < len(lengths) and kinds[run_end] == ISOLATED:
                run_end += 1
            longest = max(lengths[s:run_end])
            for t in range(s, run_end):
                out.extend(range(pos, pos + lengths[t]))
            pos += longest
            s = run_end
        else:
            out.extend(range(pos, pos + lengths[s]))
            pos += lengths[s]
            s += 1
    return np.array(out, dtype=np.int64)


# ------------------------------------------------------------------- attention


def _f64(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def attention_reference(q, k, v, mask, bias_matrix=None, scale=None):
    """float64 attention of one sequence.

    q ``[Hq, Lq, D]``, k/v ``[Hkv, Lk, D]`` (torch or NumPy, any float dtype),
    mask bool ``[Lq, Lk]``, bias_matrix ``[Lq, Lk]`` or None. Query head ``h``
    reads KV head ``h // (Hq // Hkv)`` (GQA by index mapping, nothing repeated).
    Returns ``(out [Hq, Lq, D], lse [Hq, Lq])`` as float64 NumPy arrays; a row
    with no allowed key gives out 0 and lse -inf.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    mask = np.asarray(mask, dtype=bool)
    Hq, Lq, D = q.shape
    Hkv = k.shape[0]
    assert Hq % Hkv == 0
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bias = np.zeros(mask.shape) if bias_matrix is None else np.asarray(bias_matrix, np.float64)
    out = np.zeros((Hq, Lq, v.shape[-1]))
    lse = np.full((Hq, Lq), -np.inf)
    live = mask.any(axis=1)
    for h in range(Hq):
        kh, vh = k[h // group], v[h // group]
        s = scale * (q[h] @ kh.T) + bias
        s = np.where(mask, s, -np.inf)
        m = np.where(live, s.max(axis=1, initial=-np.inf), 0.0)
        p = np.where(mask, np.exp(s - m[:, None]), 0.0)
        den = p.sum(axis=1)
        safe = np.where(live, den, 1.0)
        out[h] = np.where(live[:, None], (p @ vh) / safe[:, None], 0.0)
        lse[h] = np.where(live, m + np.log(safe), -np.inf)
    return out, lse


def reference_for_spec(q, k, v, spec: Spec, scale=None, seq_len=None):
    """Reference for one sequence of a padded batch (q ``[Hq, Lq, D]``,
    k/v ``[Hkv, Lk, D]``): the sequence is ``seq_len`` long (default: its
    layout's length), queries sit at the last ``Lq`` rows of the ``Lk`` axis."""
    Lq, Lk = q.shape[1], k.shape[1]
    m = spec_mask(spec, q_len=Lq, kv_len=Lk, seq_len=seq_len)
    b = spec_bias(spec, q_len=Lq, kv_len=Lk, seq_len=seq_len)
    return attention_reference(q, k, v, m, b, scale)


def reference_padded(q, k, v, specs: Sequence[Spec], scale=None, seq_lens=None):
    """Reference of a padded batch: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``."""
    outs, lses = [], []
    for b, spec in enumerate(specs):
        o, l = reference_for_spec(q[b], k[b], v[b], spec, scale,
                                  None if seq_lens is None else int(seq_lens[b]))
        outs.append(o)
        lses.append(l)
    return np.stack(outs), np.stack(lses)


def reference_packed(q, k, v, specs: Sequence[Spec], cu_q, cu_k, scale=None):
    """Reference of a packed (varlen) batch: q ``[total_q, Hq, D]``, k/v
    ``[total_k, Hkv, D]``; sequence b's queries are its last q_len positions.
    Returns out ``[total_q, Hq, D]`` and lse ``[Hq, total_q]``."""
    cu_q = [int(x) for x in cu_q]
    cu_k = [int(x) for x in cu_k]
    Hq, D = q.shape[1], v.shape[2]
    out = np.zeros((cu_q[-1], Hq, D))
    lse = np.full((Hq, cu_q[-1]), -np.inf)
    for b, spec in enumerate(specs):
        qb = _f64(q[cu_q[b]:cu_q[b + 1]]).transpose(1, 0, 2)
        kb = _f64(k[cu_k[b]:cu_k[b + 1]]).transpose(1, 0, 2)
        vb = _f64(v[cu_k[b]:cu_k[b + 1]]).transpose(1, 0, 2)
        o, l = reference_for_spec(qb, kb, vb, spec, scale)
        out[cu_q[b]:cu_q[b + 1]] = o.transpose(1, 0, 2)
        lse[:, cu_q[b]:cu_q[b + 1]] = l
    return out, lse


def pack(tensors, lens):
    """Concatenate ``[L_b, H, D]`` slices of per-sequence tensors (``[H, L_b, D]``)
    into one ``[sum L_b, H, D]`` tensor, plus its int32 cu_seqlens."""
    parts = [t[:, :n].swapaxes(0, 1) for t, n in zip(tensors, lens)]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    if torch is not None and isinstance(parts[0], torch.Tensor):
        return torch.cat(parts).contiguous(), torch.from_numpy(cu)
    return np.ascontiguousarray(np.concatenate(parts)), cu


def block_summary(mask: np.ndarray, q_block: int, kv_block: int):
    """Partial/full block flags ``[nq, nk]`` of a dense mask, padded with False
    up to whole blocks (what a block is: all pairs allowed = full)."""
    Q, K = mask.shape
    nq, nk = -(-Q // q_block), -(-K // kv_block)
    padded = np.zeros((nq * q_block, nk * kv_block), dtype=bool)
    padded[:Q, :K] = mask
    counts = padded.reshape(nq, q_block, nk, kv_block).sum(axis=(1, 3))
    full = counts == q_block * kv_block
    partial = (counts > 0) & ~full
    return partial, full


# ------------------------------------------------------------------ strategies

if st is not None:

    @st.composite
    def layouts(
        draw,
        min_segments: int = 1,
        max_segments: int = 64,
        max_length: int = 300,
        max_total: Optional[int] = None,
        with_biases: Optional[bool] = None,
    ) -> Spec:
        """Random layouts: mixed kinds, one-token segments, shared prefixes,
        isolated runs, global tails and optional finite biases.

        ``max_total`` caps the layout length (segments are cut down to fit),
        which keeps the dense reference affordable."""
        shape = draw(st.sampled_from(["mixed", "ensemble", "ensemble", "one_token", "single"]))
        if shape == "single":
            n = 1
        else:
            n = draw(st.integers(min_segments if shape != "ensemble" else max(min_segments, 2),
                                 max(max_segments, min_segments)))
            n = max(n, min_segments)
        small = draw(st.booleans())
        hi = max_length if not small else min(max_length, 8)
        if shape == "one_token":
            lengths = [draw(st.integers(1, 2)) for _ in range(n)]
        else:
            lengths = [draw(st.one_of(st.just(1), st.integers(1, hi))) for _ in range(n)]
        if shape == "ensemble":
            # [shared prefix]? [isolated]* [global tail]? - the workflow's layouts
            kinds = [ISOLATED] * n
            if n >= 2 and draw(st.booleans()):
                kinds[0] = SHARED
            if n >= 2 and draw(st.booleans()):
                kinds[-1] = GLOBAL
                if n >= 4 and draw(st.booleans()):
                    kinds[-2] = GLOBAL
        else:
            kinds = [draw(st.sampled_from(KINDS)) for _ in range(n)]
        if max_total is not None:
            budget = max_total
            cut = []
            for length in lengths:
                if budget <= 0:
                    break
                take = min(length, budget)
                cut.append(take)
                budget -= take
            lengths = cut
            kinds = kinds[: len(lengths)]
        use_bias = draw(st.booleans()) if with_biases is None else with_biases
        biases = None
        if use_bias:
            biases = tuple(
                draw(st.one_of(st.just(0.0),
                               st.floats(-4.0, 2.0, allow_nan=False, allow_infinity=False),
                               st.just(-math.log(max(2, len(lengths))))))
                for _ in lengths
            )
        return Spec(tuple(int(x) for x in lengths), tuple(kinds), biases)

    def batches(max_batch: int = 4, **kw):
        """Lists of 1..max_batch layouts of (usually) different lengths."""
        return st.lists(layouts(**kw), min_size=1, max_size=max_batch)
