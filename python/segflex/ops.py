"""The attention ops: checks in Python, arithmetic in C (CPU) or CUDA (GPU).

``attention`` is prefill over segment layouts, ``decode`` is a few new (global) tokens
against a KV cache. Both take torch tensors (CPU or CUDA) or NumPy arrays (float32, CPU).
With torch, the work goes through the ``torch.library`` ops ``segflex::attention`` and
``segflex::decode``, which have fake implementations, so ``torch.compile(fullgraph=True)``
traces through them and CUDA graphs capture them.

Every argument is checked here, because the C core trusts the addresses it is handed.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from . import _C
from .layout import LayoutTable, SegmentLayout, as_layout_list, pack_layouts

_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
CUDA_HEAD_DIMS = (64, 128)
MAX_CPU_HEAD_DIM = 256
MAX_DECODE_TOKENS = 8


def _threads() -> int:
    """OpenMP threads for the CPU kernels: torch's setting when torch is loaded."""
    env = os.environ.get("SEGFLEX_NUM_THREADS")
    if env:
        return int(env)
    import sys
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0


# ------------------------------------------------------------------------- checks
def _is_torch(x) -> bool:
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _dtype_name(x) -> str:
    return str(x.dtype).replace("torch.", "")


def _check_tensors(names: Sequence[str], tensors: Sequence, ndim: int) -> str:
    """Same kind, device and dtype for all; returns the device kind ('cpu'/'cuda'/'numpy')."""
    first = tensors[0]
    if isinstance(first, np.ndarray):
        kind = "numpy"
    elif _is_torch(first):
        kind = first.device.type
    else:
        raise TypeError(f"{names[0]} must be a torch.Tensor or numpy.ndarray, "
                        f"got {type(first).__name__}")
    for name, t in zip(names, tensors):
        if kind == "numpy" and not isinstance(t, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray like {names[0]}, got {type(t).__name__}")
        if kind != "numpy":
            if not _is_torch(t):
                raise TypeError(f"{name} must be a torch.Tensor like {names[0]}, "
                                f"got {type(t).__name__}")
            if t.device != first.device:
                raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {_dtype_name(t)} but {names[0]} has "
                            f"{_dtype_name(first)}")
        if t.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
        last_stride = t.strides[-1] // t.itemsize if kind == "numpy" else t.stride(-1)
        if t.shape[-1] > 1 and last_stride != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    if kind not in ("numpy", "cpu", "cuda"):
        raise ValueError(f"{names[0]} is on an unsupported device {first.device}")
    name = _dtype_name(first)
    allowed = {"numpy": ("float32",), "cpu": ("float32", "bfloat16", "float16"),
               "cuda": ("bfloat16", "float16")}[kind]
    if name not in allowed:
        where = {"numpy": "NumPy arrays", "cpu": "CPU tensors", "cuda": "CUDA tensors"}[kind]
        raise TypeError(f"{names[0]} has dtype {name}; {where} must be one of {allowed}")
    if kind == "cuda" and not _C.cuda_available():
        raise RuntimeError("the tensors are on CUDA but segflex was built without CUDA "
                           "(reinstall with SEGFLEX_CUDA=1 where nvcc is available)")
    return kind


def _check_heads(q_heads: int, kv_heads: int, head_dim: int, device: str) -> None:
    if kv_heads < 1 or q_heads < 1:
        raise ValueError("q and k must have at least one head")
    if q_heads % kv_heads:
        raise ValueError(f"the number of query heads ({q_heads}) must be a multiple of the "
                         f"number of key/value heads ({kv_heads})")
    if device == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        raise ValueError(f"head dimension {head_dim} is not supported on CUDA "
                         f"(supported: {CUDA_HEAD_DIMS})")
    if not 1 <= head_dim <= MAX_CPU_HEAD_DIM:
        raise ValueError(f"head dimension must be 1..{MAX_CPU_HEAD_DIM}, got {head_dim}")


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _host_int_array(name: str, value, size: int | None = None) -> np.ndarray:
    arr = value.detach().cpu().numpy() if _is_torch(value) else np.asarray(value)
    if arr.ndim != 1 or (size is not None and arr.shape[0] != size):
        want = f"[{size}]" if size is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got {arr.dtype}")
    return arr.astype(np.int64)


# ------------------------------------------------------------------------- geometry
class _Geometry:
    """Where the rows of each sequence lie (sf_seqs): int32 arrays, NumPy on the host or torch
    tensors on the tensors' device, plus the bound on q_len and the batch form."""

    def __init__(self, q_start, q_len, k_start, kv_len, max_q_len: int, packed: bool):
        self.q_start, self.q_len, self.k_start, self.kv_len = q_start, q_len, k_start, kv_len
        self.max_q_len = int(max_q_len)
        self.packed = packed

    @classmethod
    def host(cls, q_start, q_len, k_start, kv_len, max_q_len, packed) -> "_Geometry":
        arr = (lambda a: np.ascontiguousarray(a, dtype=np.int32))
        return cls(arr(q_start), arr(q_len), arr(k_start), arr(kv_len), max_q_len, packed)


def _strides(t, packed: bool) -> tuple[int, int, int]:
    """(stride_b, stride_h, stride_t) in elements of a [B,H,T,D] or packed [T,H,D] tensor."""
    s = [x // t.itemsize for x in t.strides] if isinstance(t, np.ndarray) else list(t.stride())
    return (0, s[1], s[0]) if packed else (s[0], s[1], s[2])


def _prefill_geometry(q, k, table: LayoutTable, cu_seqlens_q, cu_seqlens_k) -> _Geometry:
    batch = table.batch
    lengths = np.asarray(table.host_lengths, dtype=np.int64)
    if cu_seqlens_q is None and cu_seqlens_k is None:
        if q.shape[0] != batch or k.shape[0] != batch:
            raise ValueError(f"q and k have batch {q.shape[0]} and {k.shape[0]} but there are "
                             f"{batch} layouts")
        Lq, Lk = q.shape[2], k.shape[2]
        if Lq > Lk:
            raise ValueError(f"q has {Lq} rows but k only {Lk}: queries sit at the end of the "
                             "key range, so q_len must not exceed kv_len")
        if lengths.max() > Lk:
            raise ValueError(f"a layout has {lengths.max()} tokens but k has only {Lk} rows")
        # Query row i sits at position i + (Lk - Lq), as in FlexAttention; rows past a
        # sequence's end are padding.
        q_len = np.clip(lengths - (Lk - Lq), 0, None)
        zeros = np.zeros(batch, dtype=np.int64)
        return _Geometry.host(zeros, q_len, zeros, lengths, Lq, packed=False)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    cq = _host_int_array("cu_seqlens_q", cu_seqlens_q, batch + 1)
    ck = _host_int_array("cu_seqlens_k", cu_seqlens_k, batch + 1)
    for name, cu, total in (("cu_seqlens_q", cq, q.shape[0]), ("cu_seqlens_k", ck, k.shape[0])):
        if cu[0] != 0 or np.any(np.diff(cu) < 0):
            raise ValueError(f"{name} must start at 0 and never decrease")
        if cu[-1] > total:
            raise ValueError(f"{name} ends at {cu[-1]} but the tensor has {total} rows")
    q_len, kv_len = np.diff(cq), np.diff(ck)
    if np.any(kv_len != lengths):
        b = int(np.nonzero(kv_len != lengths)[0][0])
        raise ValueError(f"cu_seqlens_k gives sequence {b} {kv_len[b]} keys but its layout has "
                         f"{lengths[b]} tokens")
    if np.any(q_len > kv_len):
        b = int(np.nonzero(q_len > kv_len)[0][0])
        raise ValueError(f"cu_seqlens_q gives sequence {b} more queries ({q_len[b]}) than keys "
                         f"({kv_len[b]})")
    return _Geometry.host(cq[:-1], q_len, ck[:-1], kv_len, int(q_len.max(initial=0)), packed=True)


def _tensor_geometry(q, k, seg_ptr, seg_end, cu_q, cu_k, max_seqlen_q: int) -> _Geometry:
    """The same geometry computed with torch on the tensors' device: no host round trip, so
    new lengths neither synchronise nor recompile (the wrapper has checked them already).
    Few small kernels: the C side reads only the first ``batch`` entries of each array, so
    cu_seqlens serve as the start offsets as they are."""
    import torch
    i32 = torch.int32
    if cu_q is None:
        batch = seg_ptr.shape[0] - 1
        lengths = seg_end.index_select(0, seg_ptr[1:] - 1)  # each sequence's last segment end
        Lq, Lk = q.shape[2], k.shape[2]
        q_len = lengths if Lq == Lk else (lengths - (Lk - Lq)).clamp_min(0).to(i32)
        zeros = _constant_rows(batch, 0, q.device)[0]
        return _Geometry(zeros, q_len, zeros, lengths, Lq, packed=False)
    cu_q, cu_k = cu_q.to(q.device, i32), cu_k.to(q.device, i32)
    return _Geometry(cu_q, torch.diff(cu_q), cu_k, torch.diff(cu_k), max_seqlen_q, packed=True)


# ------------------------------------------------------------------------- the C call
def _call(op: int, table: LayoutTable | None, geo: _Geometry, q, k, v, out, lse, scale: float,
          heads_q: int, heads_kv: int, head_dim: int, workspace=None, stream: int = 0) -> None:
    """Runs op 0 (CPU attention), 1 (CUDA prefill) or 2 (CUDA decode) through module.c."""
    addr = (lambda t: t.ctypes.data) if isinstance(q, np.ndarray) else (lambda t: t.data_ptr())
    seq_addr = [addr(a) for a in (geo.q_start, geo.q_len, geo.k_start, geo.kv_len)]
    layout_args = table.c_args() if table is not None else (geo.q_len.shape[0], 0, 0, 0, 0)
    tensors = []
    for t in (q, k, v, out):
        tensors += [addr(t), *_strides(t, geo.packed)]
    if lse is None:
        lse_args = (0, 0, 0)
    else:  # padded lse [B, Hq, Lq]; packed lse [Hq, total_q]
        ls = [x // 4 for x in lse.strides] if isinstance(lse, np.ndarray) else list(lse.stride())
        lse_args = (addr(lse), 0, ls[0]) if geo.packed else (addr(lse), ls[0], ls[1])
    ws_addr, ws_bytes = (workspace.data_ptr(), workspace.numel()) if workspace is not None else (0, 0)
    dtype = _DTYPE_CODES[_dtype_name(q)]
    _C.attention(op, *layout_args, geo.q_len.shape[0], *seq_addr, geo.max_q_len, heads_q,
                 heads_kv, head_dim, scale, dtype, *tensors, *lse_args, ws_addr, ws_bytes, stream,
                 _threads())


def attention(q, k, v, layouts, scale: float | None = None, return_lse: bool = False,
              cu_seqlens_q=None, cu_seqlens_k=None):
    """Segment-masked attention (prefill).

    Args:
        q: ``[B, Hq, Lq, D]``, or packed ``[total_q, Hq, D]`` with ``cu_seqlens_q``.
        k, v: ``[B, Hkv, Lk, D]``, or packed ``[total_k, Hkv, D]`` with ``cu_seqlens_k``.
            ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention, K/V never copied).
        layouts: one :class:`SegmentLayout` per sequence (or a single one for B=1), or a
            :class:`LayoutTable` packed once with :func:`segflex.pack`.
        scale: multiplies ``q.k`` (default ``1/sqrt(D)``).
        return_lse: also return the float32 log-sum-exp of every row's scores.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]`` offsets of the packed form.

    Padded: sequence b has ``len(layouts[b])`` keys; query row i sits at position
    ``i + Lk - Lq``; rows past a sequence's end come out 0 (lse ``-inf``). Packed: each
    sequence's queries are its last ``q_len`` positions. CPU takes float32, bfloat16, float16
    (and NumPy float32); CUDA bfloat16 and float16, head dims 64 and 128.
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    kind = _check_tensors(("q", "k", "v"), (q, k, v), 3 if packed else 4)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    hq, hkv = (q.shape[1], k.shape[1])
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q has head dimension {q.shape[-1]} but k has {k.shape[-1]}")
    _check_heads(hq, hkv, q.shape[-1], kind)
    scale = _scale(scale, q.shape[-1])
    table = layouts if isinstance(layouts, LayoutTable) else pack_layouts(as_layout_list(layouts))
    if kind == "numpy":
        return _attention_numpy(q, k, v, table, scale, return_lse, cu_seqlens_q, cu_seqlens_k)
    import torch
    as_t = (lambda c: c if c is None or _is_torch(c) else torch.as_tensor(np.asarray(c), dtype=torch.int32))
    cu_q, cu_k = as_t(cu_seqlens_q), as_t(cu_seqlens_k)
    geo = _prefill_geometry(q, k, table, cu_q, cu_k)  # checks here, with clear messages
    dev = table.to(q.device)
    out, lse = torch.ops.segflex.attention(q, k, v, dev.seg_ptr, dev.seg_end, dev.seg_kind,
                                           dev.seg_bias, cu_q, cu_k, geo.max_q_len, scale,
                                           return_lse)
    return (out, lse) if return_lse else out


def _attention_numpy(q, k, v, table, scale, return_lse, cu_q, cu_k):
    geo = _prefill_geometry(q, k, table, cu_q, cu_k)
    out = np.zeros(q.shape, dtype=np.float32)
    lse = None
    if return_lse:
        shape = (q.shape[1], q.shape[0]) if geo.packed else (q.shape[0], q.shape[1], q.shape[2])
        lse = np.full(shape, -np.inf, dtype=np.float32)
    _call(0, table, geo, q, k, v, out, lse, scale, q.shape[1], k.shape[1], q.shape[-1])
    return (out, lse) if return_lse else out


def decode(q, k_cache, v_cache, cache_lens, layouts=None, scale: float | None = None,
           return_lse: bool = False):
    """Attention of a few new tokens per sequence over a KV cache.

    Args:
        q: ``[B, Hq, Q, D]``, Q = 1..8 new tokens, already written at the end of each cache.
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` (the layout of a static cache).
        cache_lens: ``[B]`` integers, each sequence's valid cache length *including* the new
            tokens (a torch tensor on the same device is read there, with no host sync).
        layouts: optional, one per sequence: the bias of each key's segment is added (the new
            tokens are global). Keys past a layout's end have bias 0.
        scale: multiplies ``q.k`` (default ``1/sqrt(D)``).

    The new tokens attend causally among themselves and to the whole cache before them.
    """
    kind = _check_tensors(("q", "k_cache", "v_cache"), (q, k_cache, v_cache), 4)
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(f"k_cache and v_cache must have the same shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, hq, n_new, D = q.shape
    if k_cache.shape[0] != B:
        raise ValueError(f"q has batch {B} but k_cache has {k_cache.shape[0]}")
    if k_cache.shape[-1] != D:
        raise ValueError(f"q has head dimension {D} but k_cache has {k_cache.shape[-1]}")
    if not 1 <= n_new <= MAX_DECODE_TOKENS:
        raise ValueError(f"q must hold 1..{MAX_DECODE_TOKENS} new tokens per sequence, got {n_new}")
    _check_heads(hq, k_cache.shape[1], D, kind)
    scale = _scale(scale, D)
    table = None
    if layouts is not None:
        table = layouts if isinstance(layouts, LayoutTable) else pack_layouts(as_layout_list(layouts))
        if table.batch != B:
            raise ValueError(f"there are {table.batch} layouts but q has batch {B}")
    s_max = k_cache.shape[2]
    on_device_lens = kind == "cuda" and _is_torch(cache_lens) and cache_lens.device == q.device
    if on_device_lens:
        if cache_lens.ndim != 1 or cache_lens.shape[0] != B:
            raise ValueError(f"cache_lens must have shape [{B}], got {tuple(cache_lens.shape)}")
        if cache_lens.dtype.is_floating_point or cache_lens.dtype == __import__("torch").bool:
            raise TypeError(f"cache_lens must hold integers, got {cache_lens.dtype}")
    else:
        lens = _host_int_array("cache_lens", cache_lens, B)
        if np.any(lens < n_new) or np.any(lens > s_max):
            raise ValueError(f"cache_lens must lie in [{n_new}, {s_max}] (the new tokens are in "
                             f"the cache; the cache holds {s_max}), got {lens.tolist()}")
        if table is not None and np.any(np.asarray(table.host_lengths) > lens):
            b = int(np.nonzero(np.asarray(table.host_lengths) > lens)[0][0])
            raise ValueError(f"layouts[{b}] has {table.host_lengths[b]} tokens but cache_lens[{b}] "
                             f"is only {lens[b]}")
    if kind == "numpy":
        if table is not None:
            table = table.global_from(lens - n_new)  # the new tokens are global
        geo = _Geometry.host(np.zeros(B), np.full(B, n_new), np.zeros(B), lens, n_new, packed=False)
        out = np.zeros(q.shape, dtype=np.float32)
        lse = np.full(q.shape[:3], -np.inf, dtype=np.float32) if return_lse else None
        _call(0, table, geo, q, k_cache, v_cache, out, lse, scale, hq, k_cache.shape[1], D)
        return (out, lse) if return_lse else out
    import torch
    lens_t = cache_lens if on_device_lens else torch.as_tensor(lens, dtype=torch.int32)
    if table is not None:
        dev = table.to(q.device)
        tabs = (dev.seg_ptr, dev.seg_end, dev.seg_kind, dev.seg_bias)
    else:
        tabs = (None, None, None, None)
    out, lse = torch.ops.segflex.decode(q, k_cache, v_cache, lens_t.to(q.device, torch.int32),
                                        *tabs, scale, return_lse)
    return (out, lse) if return_lse else out


def pack(layouts, device="cpu") -> LayoutTable:
    """Packs a batch of layouts once, on ``device``, for repeated ``attention`` calls."""
    table = pack_layouts(as_layout_list(layouts))
    return table if str(device) == "cpu" and not _torch_loaded() else table.to(device)


def _torch_loaded() -> bool:
    import sys
    return "torch" in sys.modules


# ------------------------------------------------------------------------- torch ops
_workspaces: dict = {}
_outgrown: list = []


def _workspace(device, nbytes: int):
    """A reusable device buffer per device, grown (doubling) when a call needs more.

    An outgrown buffer is kept, never freed: a CUDA graph captured with it keeps writing to
    its address at every replay."""
    import torch
    buf = _workspaces.get(device)
    if buf is None or buf.numel() < nbytes:
        if buf is not None:
            _outgrown.append(buf)
            nbytes = max(nbytes, 2 * buf.numel())
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        _workspaces[device] = buf
    return buf


def _register_torch_ops() -> None:
    import torch

    @torch.library.custom_op("segflex::attention", mutates_args=())
    def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_ptr: torch.Tensor,
                     seg_end: torch.Tensor, seg_kind: torch.Tensor, seg_bias: torch.Tensor,
                     cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                     max_seqlen_q: int, scale: float,
                     return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        table = LayoutTable(seg_ptr, seg_end, seg_kind, seg_bias, None, (0,) * (seg_ptr.shape[0] - 1))
        geo = _tensor_geometry(q, k, seg_ptr, seg_end, cu_seqlens_q, cu_seqlens_k, max_seqlen_q)
        out = _new_out(q, geo.packed, zeros=True)
        lse = _empty_lse(q, geo.packed, return_lse)
        op, stream = (1, torch.cuda.current_stream(q.device).cuda_stream) if q.is_cuda else (0, 0)
        _call(op, table, geo, q, k, v, out, lse if return_lse else None, scale, q.shape[1],
              k.shape[1], q.shape[-1], None, stream)
        return out, lse

    @attention_op.register_fake
    def _(q, k, v, seg_ptr, seg_end, seg_kind, seg_bias, cu_seqlens_q, cu_seqlens_k,
          max_seqlen_q, scale, return_lse):
        packed = cu_seqlens_q is not None
        return _new_out(q, packed, zeros=False), _empty_lse(q, packed, return_lse)

    @torch.library.custom_op("segflex::decode", mutates_args=())
    def decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cache_lens: torch.Tensor, seg_ptr: torch.Tensor | None,
                  seg_end: torch.Tensor | None, seg_kind: torch.Tensor | None,
                  seg_bias: torch.Tensor | None, scale: float,
                  return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        B, hq, n_new, D = q.shape
        table = None
        if seg_ptr is not None:
            table = LayoutTable(seg_ptr, seg_end, seg_kind, seg_bias, None, (0,) * B)
        out = _new_out(q, False, zeros=False)
        lse = _empty_lse(q, False, return_lse)
        zeros, news = _constant_rows(B, n_new, q.device)
        geo = _Geometry(zeros, news, zeros, cache_lens.to(torch.int32).contiguous(), n_new,
                        packed=False)
        if q.is_cuda:
            nbytes = _C.cuda_workspace_bytes(B, n_new, k_cache.shape[2], hq, k_cache.shape[1], D)
            ws = _workspace(q.device, nbytes)
            _call(2, table, geo, q, k_cache, v_cache, out, lse if return_lse else None, scale,
                  hq, k_cache.shape[1], D, ws, torch.cuda.current_stream(q.device).cuda_stream)
        else:
            if table is not None:  # the new tokens are global, whatever the layout says
                table = table.global_from(cache_lens.numpy().astype(np.int64) - n_new)
            _call(0, table, geo, q, k_cache, v_cache, out, lse if return_lse else None, scale,
                  hq, k_cache.shape[1], D)
        return out, lse

    @decode_op.register_fake
    def _(q, k_cache, v_cache, cache_lens, seg_ptr, seg_end, seg_kind, seg_bias, scale,
          return_lse):
        return _new_out(q, False, zeros=False), _empty_lse(q, False, return_lse)


def _new_out(q, packed: bool, zeros: bool):
    """The output buffer. Padded outputs are [B, H, L, D] views of [B, L, H, D] memory: the
    layout transformers wants next, so its transpose back costs no copy."""
    import torch
    make = torch.zeros if zeros else torch.empty
    if packed:
        return make(q.shape, dtype=q.dtype, device=q.device)
    B, H, L, D = q.shape
    return make((B, L, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


_row_constants: dict = {}


def _constant_rows(batch: int, n_new: int, device):
    """(zeros, n_new) int32 vectors of a batch: the row starts and lengths of a decode call,
    and the zero starts of a padded prefill. Constants, made once (no kernels per call, and
    safe to capture in a CUDA graph)."""
    import torch
    key = (batch, n_new, str(device))
    if key not in _row_constants:
        _row_constants[key] = (torch.zeros(batch, dtype=torch.int32, device=device),
                               torch.full((batch,), n_new, dtype=torch.int32, device=device))
    return _row_constants[key]


def _empty_lse(q, packed: bool, wanted: bool):
    import torch
    if not wanted:
        return torch.empty(0, dtype=torch.float32, device=q.device)
    shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[1], q.shape[2])
    return torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)


try:  # torch is optional: the NumPy paths work without it
    import torch  # noqa: F401  (module scope: the op signatures' annotations name it)
except ImportError:  # pragma: no cover - exercised by a subprocess test
    torch = None
else:
    _register_torch_ops()
