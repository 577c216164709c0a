"""GPU kernels (prefill, decode, block mask) against a float64 dense-mask reference.

The reference below is written from the mask definition alone (DESIGN section 1), never
from the code under test. Error bound for the half-precision kernels: the maximum absolute
error may be at most twice the error of torch's SDPA run in the same precision with the
same dense mask and bias, plus a tiny absolute floor.

Skipped unless torch sees a CUDA device and segflex was built with its CUDA kernels.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
segflex = pytest.importorskip("segflex")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not segflex.cuda_available(), reason="segflex built without CUDA"),
]

QUICK = os.environ.get("SEGFLEX_GPU_QUICK") == "1"  # small sizes (sanitizer runs)
EXAMPLES = 6 if QUICK else 40
# Example count only; determinism and health checks follow the profile of conftest.py.
HSET = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
KIND_CODE = {"shared": 0, "isolated": 1, "global": 2}
FLOOR = 1e-4  # absolute floor of the error bound
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------- the reference
def position_facts(layout, n: int):
    """Segment index, kind code and bias of positions 0..n-1; positions at or past the
    layout's length form an implicit trailing global segment with bias 0."""
    ends = np.cumsum(layout.lengths)
    seg = np.searchsorted(ends, np.arange(n), side="right")
    kinds = np.array([KIND_CODE[k] for k in layout.kinds] + [2])
    biases = np.array(list(layout.biases) + [0.0], dtype=np.float64)
    return seg, kinds[seg], biases[seg]


def dense_mask_bias(layout, q_pos: np.ndarray, n_keys: int):
    """Boolean mask [nq, nk] and float64 bias [nq, nk] straight from the definition."""
    seg, kind, bias = position_facts(layout, max(n_keys, int(q_pos.max(initial=0)) + 1))
    k_pos = np.arange(n_keys)
    sq, kq = seg[q_pos][:, None], kind[q_pos][:, None]
    sk, kk = seg[k_pos][None, :], kind[k_pos][None, :]
    q_global = kq == 2
    mask = (k_pos[None, :] <= q_pos[:, None]) & (q_global | (sk == sq) | (kk == 0))
    full_bias = np.where(q_global, bias[k_pos][None, :], 0.0)
    return mask, full_bias


def reference(q, k, v, mask, bias, scale):
    """float64 attention. q [Hq, nq, D], k/v [Hkv, nk, D] (any float dtype, on the GPU);
    returns out [Hq, nq, D] and lse [Hq, nq] (float64)."""
    hq, hkv = q.shape[0], k.shape[0]
    q64, k64, v64 = (t.double() for t in (q, k, v))
    k64 = k64.repeat_interleave(hq // hkv, dim=0)
    v64 = v64.repeat_interleave(hq // hkv, dim=0)
    m = torch.as_tensor(np.ascontiguousarray(mask), device=q.device)
    s = scale * q64 @ k64.transpose(1, 2) + torch.as_tensor(np.ascontiguousarray(bias),
                                                            device=q.device)
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v64, lse


def sdpa_peer(q, k, v, mask, bias, scale):
    """torch SDPA in the inputs' precision with the same dense mask and bias."""
    hq, hkv = q.shape[0], k.shape[0]
    add = torch.as_tensor(np.where(mask, bias, -np.inf), device=q.device, dtype=q.dtype)
    kk = k.repeat_interleave(hq // hkv, dim=0)
    vv = v.repeat_interleave(hq // hkv, dim=0)
    return torch.nn.functional.scaled_dot_product_attention(
        q[None], kk[None], vv[None], attn_mask=add[None, None], scale=scale)[0]


def check_close(got, ref, peer, what: str) -> float:
    """max|got - ref| <= 2 max|peer - ref| + FLOOR; returns the measured error."""
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got.double() - ref).abs().max().item()
    err_peer = (peer.double() - ref).abs().max().item()
    assert err <= 2 * err_peer + FLOOR, f"{what}: error {err:.3g} vs SDPA {err_peer:.3g}"
    return err


# ----------------------------------------------------------------------- strategies
SEG_LEN = st.one_of(st.just(1), st.integers(1, 8), st.integers(9, 70), st.integers(60, 160))


@st.composite
def layouts(draw, max_segments: int = 64, max_tokens: int = 900):
    """Random layouts: optional shared prefix, a body of any kinds, optional global tail."""
    n = draw(st.integers(1, max_segments))
    lengths, kinds = [], []
    if draw(st.booleans()):
        lengths.append(draw(SEG_LEN))
        kinds.append("shared")
    for _ in range(n):
        if sum(lengths) >= max_tokens:
            break
        lengths.append(draw(SEG_LEN))
        kinds.append(draw(st.sampled_from(["isolated", "isolated", "shared", "global"])))
    if draw(st.booleans()):
        lengths.append(draw(st.integers(1, 20)))
        kinds.append("global")
    biases = None
    if draw(st.booleans()):
        biases = [draw(st.sampled_from([0.0, -math.log(5), 0.7, -2.5])) for _ in lengths]
    return segflex.SegmentLayout(lengths, kinds, biases)


def heads_strategy():
    return st.tuples(st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([1, 2]))


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------- prefill
def run_prefill(lays, hq, hkv, d, dtype, gen, scale, q_lens=None, lk=None, lq=None):
    """segflex.attention on random inputs, packed (q_lens query rows per sequence) or padded
    (q [B, hq, lq], k and v [B, hkv, lk], NaN past every sequence's end: never read). Returns
    each sequence's (q, k, v, out, lse, query rows) for check_views."""
    lens = [len(lay) for lay in lays]
    views = []
    if q_lens is not None:
        cu_k = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        q = randn(int(cu_q[-1]), hq, d, dtype=dtype, gen=gen)
        k = randn(int(cu_k[-1]), hkv, d, dtype=dtype, gen=gen)
        v = randn(int(cu_k[-1]), hkv, d, dtype=dtype, gen=gen)
        out, lse = segflex.attention(q, k, v, lays, scale=scale, return_lse=True,
                                     cu_seqlens_q=torch.as_tensor(cu_q, device="cuda"),
                                     cu_seqlens_k=torch.as_tensor(cu_k, device="cuda"))
        for b in range(len(lays)):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            views.append((q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1),
                          out[qs].transpose(0, 1), lse[:, qs], q_lens[b]))
        return views
    q = randn(len(lays), hq, lq, d, dtype=dtype, gen=gen)
    k = randn(len(lays), hkv, lk, d, dtype=dtype, gen=gen)
    v = randn(len(lays), hkv, lk, d, dtype=dtype, gen=gen)
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
        q[b, :, max(0, n - (lk - lq)):] = float("nan")
    out, lse = segflex.attention(q, k, v, lays, scale=scale, return_lse=True)
    for b, n in enumerate(lens):
        ql = max(0, n - (lk - lq))
        views.append((q[b, :, :ql], k[b, :, :n], v[b, :, :n], out[b, :, :ql], lse[b, :, :ql], ql))
        assert (out[b, :, ql:] == 0).all(), "padding rows must come out 0"
    return views


def check_views(views, lays, scale, what: str) -> None:
    """Each sequence's output and lse against the float64 reference (and SDPA's error)."""
    for b, (qb, kb, vb, ob, lb, ql) in enumerate(views):
        if ql == 0:
            continue
        n = len(lays[b])
        mask, bias = dense_mask_bias(lays[b], np.arange(n - ql, n), n)
        ref, ref_lse = reference(qb, kb, vb, mask, bias, scale)
        peer = sdpa_peer(qb, kb, vb, mask, bias, scale)
        check_close(ob, ref, peer, f"{what}: {ql} rows, seq {b}")
        lse_err = (lb.double() - ref_lse).abs().max().item()
        assert lse_err <= 1e-2 + 1e-3 * ref_lse.abs().max().item(), f"lse error {lse_err}"


@HSET
@given(lays=st.lists(layouts(), min_size=1, max_size=3), heads=heads_strategy(),
       d=st.sampled_from([64, 128]), dt=st.sampled_from(sorted(DTYPES)),
       packed=st.booleans(), q_cut=st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
def test_prefill_matches_reference(lays, heads, d, dt, packed, q_cut, seed):
    """Random layouts, GQA ratios, both batch forms, queries at the end of the key range."""
    ratio, hkv = heads
    hq, dtype = ratio * hkv, DTYPES[dt]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scale = 1.0 / math.sqrt(d)
    lens = [len(lay) for lay in lays]
    if packed:
        q_lens = [max(1, n - min(q_cut, n - 1) * (b % 2 == 0)) for b, n in enumerate(lens)]
        views = run_prefill(lays, hq, hkv, d, dtype, gen, scale, q_lens=q_lens)
    else:
        lk = max(lens) + (q_cut % 3)  # some key padding past every layout
        views = run_prefill(lays, hq, hkv, d, dtype, gen, scale, lk=lk, lq=max(1, lk - q_cut))
    check_views(views, lays, scale, "prefill")


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("ratio", [1, 3, 8])
def test_prefill_self_ensemble_shapes(d, dt, ratio):
    """The workflow's layout (shared prefix, 5 isolated paraphrases, global tail), sizes
    around the tile edges (63, 64, 65, 128, 129 tokens per segment)."""
    dtype = DTYPES[dt]
    gen = torch.Generator(device="cuda").manual_seed(d + ratio)
    for seg in (63, 64, 65, 129):
        lay = segflex.SegmentLayout([17] + [seg] * 5 + [16], ["shared"] + ["isolated"] * 5 +
                                    ["global"], [0.0] + [-math.log(5)] * 5 + [0.0])
        n, hkv = len(lay), 2
        q = randn(1, ratio * hkv, n, d, dtype=dtype, gen=gen)
        k = randn(1, hkv, n, d, dtype=dtype, gen=gen)
        v = randn(1, hkv, n, d, dtype=dtype, gen=gen)
        out = segflex.attention(q, k, v, [lay])
        mask, bias = dense_mask_bias(lay, np.arange(n), n)
        ref, _ = reference(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(d))
        peer = sdpa_peer(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(d))
        check_close(out[0], ref, peer, f"segment length {seg}")


@pytest.mark.parametrize("d", [64, 128])
def test_prefill_long_sequence_many_tiles(d):
    """More key tiles than one planning round holds (73k keys: over 1024 tiles of 64 keys,
    over 512 of 128)."""
    if QUICK:
        pytest.skip("large")
    lay = segflex.SegmentLayout([30000, 40000, 3000, 20], ["shared", "isolated", "isolated",
                                                         "global"], [0.0, -0.5, 0.3, 0.0])
    n = len(lay)
    gen = torch.Generator(device="cuda").manual_seed(7)
    rows = 200  # the last rows only: the global tail sees every key
    q = randn(1, 2, rows, d, dtype=torch.bfloat16, gen=gen)
    k = randn(1, 1, n, d, dtype=torch.bfloat16, gen=gen)
    v = randn(1, 1, n, d, dtype=torch.bfloat16, gen=gen)
    out = segflex.attention(q, k, v, [lay])
    mask, bias = dense_mask_bias(lay, np.arange(n - rows, n), n)
    ref, _ = reference(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(d))
    peer = sdpa_peer(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(d))
    check_close(out[0], ref, peer, "long")


_WALK_SCRIPT = """
import math, sys
sys.path.insert(0, {tests!r})
import torch, segflex
from test_gpu import check_views, run_prefill
lay = segflex.SegmentLayout
lays = [lay([100, 250, 300, 50], ["shared", "isolated", "isolated", "global"],
            [0.0, -0.7, 0.2, 0.0]),                           # classified plans, 60-row tail
        lay([130] * 4 + [8], ["isolated"] * 4 + ["global"]),  # range plans, 8-row tail
        lay([600], ["isolated"])]                             # one segment, ends early
gen = torch.Generator(device="cuda").manual_seed(11)
scale = 1 / math.sqrt(128)
for dtype in (torch.bfloat16, torch.float16):
    lk = max(len(x) for x in lays) + 3
    views = run_prefill(lays, 6, 2, 128, dtype, gen, scale, lk=lk, lq=lk)
    check_views(views, lays, scale, "padded")
    views = run_prefill(lays, 6, 2, 128, dtype, gen, scale, q_lens=[len(x) for x in lays])
    check_views(views, lays, scale, "packed")
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma kernel needs compute capability 9.0")
def test_prefill_persistent_blocks_walk_many_items():
    """The Hopper kernel with its persistent grid capped at 3 blocks (SEGFLEX_PREFILL_GRID,
    read once per process, hence the subprocess), so that each block runs ~35 items back to
    back: the producer one item ahead, item boundaries between sequences, items whose rows
    all fall to the first warpgroup, sequences that end before the batch's last tile."""
    import subprocess
    import sys
    env = dict(os.environ, SEGFLEX_PREFILL_IMPL="wgmma", SEGFLEX_PREFILL_GRID="3")
    script = _WALK_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


_PACK_SCRIPT = """
import math, sys
sys.path.insert(0, {tests!r})
import torch, segflex
from test_gpu import check_views, run_prefill
lay = segflex.SegmentLayout
# sequences whose last 128-row tile holds 1, 16, 21, 40, 43, 64 and 65 rows
lays = [lay([120, 120, 17], ["isolated", "isolated", "global"]),
        lay([192, 192, 16], ["isolated", "isolated", "global"], [-0.4, 0.3, 0.0]),
        lay([130, 130, 124, 21], ["isolated"] * 3 + ["global"]),
        lay([256, 40], ["isolated", "global"]),
        lay([100, 150, 49], ["shared", "isolated", "global"], [0.0, -1.2, 0.0]),
        lay([128, 128, 64], ["isolated", "isolated", "global"]),
        lay([200, 121], ["isolated", "isolated"])]
gen = torch.Generator(device="cuda").manual_seed(5)
scale = 1 / math.sqrt(128)
lens = [len(x) for x in lays]
for hq, hkv in ((4, 2), (6, 2), (8, 2), (8, 1)):
    for dtype in (torch.bfloat16, torch.float16):
        lk = max(lens)
        views = run_prefill(lays, hq, hkv, 128, dtype, gen, scale, lk=lk, lq=lk)
        check_views(views, lays, scale, f"padded {{hq}}/{{hkv}}")
        views = run_prefill(lays, hq, hkv, 128, dtype, gen, scale, q_lens=lens)
        check_views(views, lays, scale, f"packed {{hq}}/{{hkv}}")
        q_lens = [37, 1, 130, 64, 21, 100, 121]  # queries at the end of the keys
        views = run_prefill(lays, hq, hkv, 128, dtype, gen, scale, q_lens=q_lens)
        check_views(views, lays, scale, f"chunk {{hq}}/{{hkv}}")
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma kernel needs compute capability 9.0")
def test_prefill_packs_heads_of_short_last_tiles():
    """The Hopper kernel (forced, in a subprocess) on sequences whose last tile has few rows,
    which one item takes for several query heads of a GQA group at once (heads_per_item):
    groups of 2, 3, 4 and 8, packs of one warpgroup's rows and of both, packs next to
    unpacked items, global tails with biases, padded, packed and chunked batches."""
    import subprocess
    import sys
    env = dict(os.environ, SEGFLEX_PREFILL_IMPL="wgmma", SEGFLEX_PREFILL_GRID="5")
    script = _PACK_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def _few_rows_layouts():
    """Long shared prefixes before short isolated segments and a short global tail, with
    biases, of nearly equal lengths (so that a padded batch gives every sequence rows)."""
    lay = segflex.SegmentLayout
    return [lay([300, 40, 37, 9], ["shared", "isolated", "isolated", "global"],
                [0.0, -1.1, 0.7, 0.0]),
            lay([290, 50, 45], ["shared", "isolated", "isolated"]),
            lay([3, 250, 61, 1, 70], ["shared", "shared", "isolated", "global", "isolated"],
                [0.0, 0.4, -2.5, 0.0, -0.3])]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("packed", [False, True])
def test_prefill_few_rows_long_prefix(d, dt, packed):
    """1..17 query rows at the end of a few hundred keys (the short-problem kernel's 16-row
    blocks, partial and whole, and a second block of one row), every query seeing a long
    shared prefix (full tiles) and a few partial tiles; a padded batch (NaN past every
    sequence's end) and a packed one. Small grids: the automatic choice takes the
    short-problem kernel here (SEGFLEX_PREFILL_IMPL forces the others)."""
    dtype, hkv, ratio = DTYPES[dt], 2, 3
    hq = ratio * hkv
    lays = _few_rows_layouts()
    lens = [len(x) for x in lays]
    scale = 1.0 / math.sqrt(d)
    gen = torch.Generator(device="cuda").manual_seed(d + 2 * packed)
    for ql in range(1, 18):
        if packed:
            views = run_prefill(lays, hq, hkv, d, dtype, gen, scale,
                                q_lens=[ql, max(1, ql - 3), 18 - ql])
        else:
            lk = max(lens) + 2
            views = run_prefill(lays, hq, hkv, d, dtype, gen, scale, lk=lk,
                                lq=ql + (lk - max(lens)))
        check_views(views, lays, scale, "few rows")


# ----------------------------------------------------------------------- decode
def decode_reference(q, kc, vc, lens, lays, scale):
    """Per sequence: new tokens are global, causal over the cache plus each key's bias."""
    outs, peers = [], []
    n_new = q.shape[2]
    for b, n in enumerate(lens):
        lay = lays[b] if lays is not None else segflex.SegmentLayout([n], ["global"])
        q_pos = np.arange(n - n_new, n)
        seg, kind, bias = position_facts(lay, n)
        mask = np.arange(n)[None, :] <= q_pos[:, None]
        bias2 = np.broadcast_to(bias[None, :], mask.shape)
        ref, lse = reference(q[b], kc[b, :, :n], vc[b, :, :n], mask, bias2, scale)
        peer = sdpa_peer(q[b], kc[b, :, :n], vc[b, :, :n], mask, bias2, scale)
        outs.append((ref, lse))
        peers.append(peer)
    return outs, peers


def random_cache(lens, hq, hkv, n_new, d, s_max, dtype, gen):
    """q [B, hq, n_new, d] and K/V caches [B, hkv, s_max, d] with NaN past every sequence's
    length: a key read past it would show in the output."""
    B = len(lens)
    q = randn(B, hq, n_new, d, dtype=dtype, gen=gen)
    kc = randn(B, hkv, s_max, d, dtype=dtype, gen=gen)
    vc = randn(B, hkv, s_max, d, dtype=dtype, gen=gen)
    for b, n in enumerate(lens):
        kc[b, :, n:] = float("nan")
        vc[b, :, n:] = float("nan")
    return q, kc, vc


def bias_layout(n: int):
    """Three biased segments over all but the last two cached positions (those fall in the
    implicit global tail, bias 0)."""
    covered = max(1, n - 2)
    a = max(1, covered // 3)
    if covered - 2 * a <= 0:
        return segflex.SegmentLayout([covered], ["isolated"], [0.5])
    return segflex.SegmentLayout([a, a, covered - 2 * a], ["shared", "isolated", "isolated"],
                                 [0.0, -1.2, 0.8])


DECODE_CASES = [  # (cache lengths, new tokens, GQA ratio, head dim)
    ([1], 1, 3, 128), ([7], 4, 2, 64), ([64], 8, 1, 128), ([65, 3], 2, 4, 128),
    ([1000, 1, 513], 1, 8, 64), ([4097], 3, 3, 128), ([32768], 1, 3, 128),
    ([32768, 9000], 8, 8, 128), ([2048] * 4, 1, 3, 128), ([300, 299], 5, 5, 64),
    ([300, 41], 8, 9, 128),  # 72 rows per KV head: a second row chunk of 8 rows
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0][:2]}-q{c[1]}-g{c[2]}-d{c[3]}")
@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_decode_matches_reference(case, dt, with_bias):
    lens, n_new, ratio, d = case
    if QUICK and max(lens) > 5000:
        pytest.skip("large")
    dtype, hkv = DTYPES[dt], 2
    hq = ratio * hkv
    gen = torch.Generator(device="cuda").manual_seed(sum(lens) + n_new)
    s_max = max(lens) + 5
    B = len(lens)
    q, kc, vc = random_cache(lens, hq, hkv, n_new, d, s_max, dtype, gen)
    lays = [bias_layout(n) for n in lens] if with_bias else None
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out, lse = segflex.decode(q, kc, vc, lens_t, layouts=lays, return_lse=True)
    refs, peers = decode_reference(q, kc, vc, lens, lays, 1 / math.sqrt(d))
    for b in range(B):
        check_close(out[b], refs[b][0], peers[b], f"decode seq {b}")
        lse_err = (lse[b].double() - refs[b][1]).abs().max().item()
        assert lse_err <= 1e-2, f"lse error {lse_err}"


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_new", [1, 3])
def test_decode_many_row_groups(d, n_new):
    """Batch x kv heads larger than the GPU's SM count: the path that fills the chip with row
    groups alone (one block per group, no split), with biases and ragged lengths."""
    B, hkv, ratio = 20, 8, 3
    rng = np.random.default_rng(d + n_new)
    lens = [int(x) for x in rng.integers(n_new, 700, size=B)]
    gen = torch.Generator(device="cuda").manual_seed(d * 10 + n_new)
    s_max = max(lens) + 3
    q, kc, vc = random_cache(lens, hkv * ratio, hkv, n_new, d, s_max, torch.bfloat16, gen)
    lays = [bias_layout(n) for n in lens]
    out = segflex.decode(q, kc, vc, torch.tensor(lens, dtype=torch.int32, device="cuda"), layouts=lays)
    refs, peers = decode_reference(q, kc, vc, lens, lays, 1 / math.sqrt(d))
    for b in range(B):
        check_close(out[b], refs[b][0], peers[b], f"decode seq {b}")


@pytest.mark.parametrize("B", [1, 3, 5, 8, 16])
def test_decode_split_counts(B):
    """Batches whose row groups leave room for 16, 5, 3, 2 and 1 splits per group (8 kv heads on
    a 132-SM H100), with caches of one key, shorter than a split, and long ones: split counts
    with and without the merge kernel, empty splits included."""
    hkv, ratio, d = 8, 3, 128
    rng = np.random.default_rng(B)
    lens = [int(x) for x in rng.choice([1, 2, 63, 64, 65, 200, 700, 3000, 9000], size=B)]
    gen = torch.Generator(device="cuda").manual_seed(100 + B)
    s_max = max(lens) + 7
    q, kc, vc = random_cache(lens, hkv * ratio, hkv, 1, d, s_max, torch.bfloat16, gen)
    lays = [bias_layout(n) for n in lens]
    out, lse = segflex.decode(q, kc, vc, torch.tensor(lens, dtype=torch.int32, device="cuda"),
                              layouts=lays, return_lse=True)
    refs, peers = decode_reference(q, kc, vc, lens, lays, 1 / math.sqrt(d))
    for b in range(B):
        check_close(out[b], refs[b][0], peers[b], f"decode seq {b} of {lens}")
        assert (lse[b].double() - refs[b][1]).abs().max().item() <= 1e-2


def test_decode_equals_prefill_last_rows():
    """The decode op on the last Q tokens of a sequence gives the prefill op's last rows."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    n_new, d, hq, hkv = 4, 128, 6, 2
    lay = segflex.SegmentLayout([40, 300, 280, 60, n_new], ["shared", "isolated", "isolated",
                                                            "isolated", "global"],
                                [0.0, -1.1, -1.1, -1.1, 0.0])
    n = len(lay)
    q = randn(1, hq, n, d, dtype=torch.bfloat16, gen=gen)
    k = randn(1, hkv, n, d, dtype=torch.bfloat16, gen=gen)
    v = randn(1, hkv, n, d, dtype=torch.bfloat16, gen=gen)
    pre = segflex.attention(q, k, v, [lay])[:, :, -n_new:]
    dec = segflex.decode(q[:, :, -n_new:].contiguous(), k, v,
                         torch.tensor([n], dtype=torch.int32, device="cuda"), layouts=[lay])
    mask, bias = dense_mask_bias(lay, np.arange(n - n_new, n), n)
    ref, _ = reference(q[0, :, -n_new:], k[0], v[0], mask, bias, 1 / math.sqrt(d))
    peer = sdpa_peer(q[0, :, -n_new:], k[0], v[0], mask, bias, 1 / math.sqrt(d))
    check_close(dec[0], ref, peer, "decode")
    check_close(pre[0], ref, peer, "prefill")
    err_peer = (peer.double() - ref).abs().max().item()
    assert (dec.double() - pre.double()).abs().max().item() <= 4 * err_peer + FLOOR


def test_decode_cuda_graph_replay_with_new_lengths():
    """Capture once, change the cache lengths in place, replay: equals eager and reference."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    B, hq, hkv, d, n_new, s_max = 3, 6, 2, 128, 2, 5000
    q = randn(B, hq, n_new, d, dtype=torch.bfloat16, gen=gen)
    kc = randn(B, hkv, s_max, d, dtype=torch.bfloat16, gen=gen)
    vc = randn(B, hkv, s_max, d, dtype=torch.bfloat16, gen=gen)
    lens = torch.tensor([100, 4000, 2], dtype=torch.int32, device="cuda")
    segflex.decode(q, kc, vc, lens)  # warm-up: workspace and module load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = segflex.decode(q, kc, vc, lens)
    for new in ([100, 4000, 2], [4999, 17, 64], [n_new, n_new, 3000]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        eager = segflex.decode(q, kc, vc, lens)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"replay differs from eager at lengths {new}"
        refs, peers = decode_reference(q, kc, vc, new, None, 1 / math.sqrt(d))
        for b in range(B):
            check_close(out[b], refs[b][0], peers[b], f"graph seq {b} lengths {new}")


# ----------------------------------------------------------------------- block masks
@HSET
@given(lays=st.lists(layouts(max_tokens=1500), min_size=1, max_size=3),
       qb=st.sampled_from([128, 64, 16, 1]), kb=st.sampled_from([128, 64, 32]),
       q_cut=st.integers(0, 300), k_extra=st.integers(0, 70))
def test_block_mask_gpu_equals_cpu(lays, qb, kb, q_cut, k_extra):
    kv_len = max(len(x) for x in lays) + k_extra
    q_len = max(1, kv_len - q_cut)
    if qb == 1 and q_len * kv_len > 4_000_000:
        q_len = max(1, 4_000_000 // kv_len)
    cpu = segflex.build_block_mask(lays, q_len=q_len, kv_len=kv_len, q_block_size=qb,
                                   kv_block_size=kb)
    gpu = segflex.build_block_mask(lays, q_len=q_len, kv_len=kv_len, q_block_size=qb,
                                   kv_block_size=kb, device="cuda")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        a, b = np.asarray(getattr(cpu, name)), getattr(gpu, name).cpu().numpy()
        assert np.array_equal(a, b), f"{name} differs"


def test_block_mask_gpu_against_dense_definition():
    """Independent of the CPU builder: block classes from the dense mask itself."""
    lay = segflex.SegmentLayout([5, 130, 1, 64, 200, 3], ["shared", "isolated", "global",
                                                          "isolated", "shared", "global"])
    q_len, kv_len, qb, kb = 390, 410, 64, 32
    gpu = segflex.build_block_mask([lay], q_len=q_len, kv_len=kv_len, q_block_size=qb,
                                   kv_block_size=kb, device="cuda")
    n = len(lay)
    q_pos = np.arange(q_len) + kv_len - q_len
    mask = np.zeros((q_len, kv_len), dtype=bool)
    inside = q_pos < n
    m, _ = dense_mask_bias(lay, q_pos[inside], n)
    mask[np.nonzero(inside)[0][:, None], np.arange(n)[None, :]] = m
    nq, nk = -(-q_len // qb), -(-kv_len // kb)
    pad = np.zeros((nq * qb, nk * kb), dtype=bool)
    pad[:q_len, :kv_len] = mask
    blocks = pad.reshape(nq, qb, nk, kb).sum(axis=(1, 3))
    full = blocks == qb * kb
    partial = (blocks > 0) & ~full
    num = gpu.kv_num_blocks.cpu().numpy()[0, 0]
    fnum = gpu.full_kv_num_blocks.cpu().numpy()[0, 0]
    idx = gpu.kv_indices.cpu().numpy()[0, 0]
    fidx = gpu.full_kv_indices.cpu().numpy()[0, 0]
    for i in range(nq):
        want_p = np.nonzero(partial[i])[0]
        want_f = np.nonzero(full[i])[0]
        assert num[i] == len(want_p) and fnum[i] == len(want_f)
        assert np.array_equal(idx[i], np.concatenate([want_p, np.nonzero(~partial[i])[0]]))
        assert np.array_equal(fidx[i], np.concatenate([want_f, np.nonzero(~full[i])[0]]))


# ----------------------------------------------------------------------- smoke (sanitizers)
def test_smoke_all_paths():
    """Every kernel once at small sizes; this is what the sanitizer runs execute."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    lay = segflex.SegmentLayout([9, 70, 1, 65, 6], ["shared", "isolated", "isolated", "isolated",
                                                    "global"], [0, -1.0, -1.0, -1.0, 0])
    n = len(lay)
    for d in (64, 128):
        q = randn(1, 3, n, d, dtype=torch.bfloat16, gen=gen)
        k = randn(1, 1, n, d, dtype=torch.bfloat16, gen=gen)
        v = randn(1, 1, n, d, dtype=torch.bfloat16, gen=gen)
        out = segflex.attention(q, k, v, [lay])
        mask, bias = dense_mask_bias(lay, np.arange(n), n)
        ref, _ = reference(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(d))
        check_close(out[0], ref, sdpa_peer(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(d)),
                    "smoke prefill")
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        outp = segflex.attention(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                                 v[0].transpose(0, 1).contiguous(), [lay], cu_seqlens_q=cu,
                                 cu_seqlens_k=cu)
        assert torch.equal(outp.transpose(0, 1), out[0])
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        dec = segflex.decode(q[:, :, -2:].contiguous(), k, v, lens, layouts=[lay])
        mask, bias = dense_mask_bias(lay, np.arange(n - 2, n), n)
        ref, _ = reference(q[0, :, -2:], k[0], v[0], mask, bias, 1 / math.sqrt(d))
        check_close(dec[0], ref, sdpa_peer(q[0, :, -2:], k[0], v[0], mask, bias,
                                           1 / math.sqrt(d)), "smoke decode")
    # a table without biases (the self-ensemble prompt's shape)
    plain = segflex.SegmentLayout([20, 33, 5, 21], ["isolated", "isolated", "isolated", "global"])
    n = len(plain)
    q = randn(1, 3, n, 128, dtype=torch.bfloat16, gen=gen)
    k = randn(1, 1, n, 128, dtype=torch.bfloat16, gen=gen)
    v = randn(1, 1, n, 128, dtype=torch.bfloat16, gen=gen)
    mask, bias = dense_mask_bias(plain, np.arange(n), n)
    ref, _ = reference(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(128))
    check_close(segflex.attention(q, k, v, [plain])[0], ref,
                sdpa_peer(q[0], k[0], v[0], mask, bias, 1 / math.sqrt(128)), "smoke plain prefill")
    # a cache long enough to be split over several blocks, so the merge of the splits runs too
    n_long = 1000
    q, kc, vc = random_cache([n_long], 3, 1, 2, 128, n_long + 5, torch.bfloat16, gen)
    lays = [bias_layout(n_long)]
    dec = segflex.decode(q, kc, vc, torch.tensor([n_long], dtype=torch.int32, device="cuda"),
                         layouts=lays)
    refs, peers = decode_reference(q, kc, vc, [n_long], lays, 1 / math.sqrt(128))
    check_close(dec[0], refs[0][0], peers[0], "smoke split decode")
    cpu = segflex.build_block_mask([lay], block_size=32)
    gpu = segflex.build_block_mask([lay], block_size=32, device="cuda")
    assert np.array_equal(np.asarray(cpu.kv_indices), gpu.kv_indices.cpu().numpy())
    torch.cuda.synchronize()
