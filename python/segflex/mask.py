"""Block masks in FlexAttention's format, built in C from segment tables, and mask pictures.

``build_block_mask`` gives, block for block, what ``torch``'s ``create_block_mask`` gives for
the equivalent ``mask_mod`` (``segflex.mask_mod``), without ever materialising the dense
[q_len, kv_len] mask: every block is classified from the few segments it touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import GLOBAL, KINDS, SHARED, SegmentLayout, as_layout_list, pack_layouts


def _check_block(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    return int(value)


def _lengths(layouts: list[SegmentLayout], q_len, kv_len) -> tuple[int, int]:
    longest = max(len(lay) for lay in layouts)
    if kv_len is None:
        kv_len = longest
    if q_len is None:
        q_len = kv_len
    for name, n in (("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"{name} must be positive, got {n}")
    if kv_len < longest:
        raise ValueError(f"kv_len ({kv_len}) is shorter than the longest layout ({longest})")
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must not exceed kv_len ({kv_len})")
    if kv_len >= 2**31:
        raise ValueError("kv_len must be below 2**31")
    return int(q_len), int(kv_len)


@dataclass(frozen=True)
class SegmentBlockMask:
    """FlexAttention's block-sparse description of a batch of layouts (one head).

    ``kv_num_blocks`` / ``full_kv_num_blocks``: int32 [B, 1, nq]; ``kv_indices`` /
    ``full_kv_indices``: int32 [B, 1, nq, nk] (NumPy arrays, or torch tensors when built on
    CUDA). Partial blocks hold some masked pairs; full blocks none.
    """

    kv_num_blocks: object
    kv_indices: object
    full_kv_num_blocks: object
    full_kv_indices: object
    layouts: tuple[SegmentLayout, ...]
    q_len: int
    kv_len: int
    q_block_size: int
    kv_block_size: int

    def to_flex(self, device=None):
        """A ``torch.nn.attention.flex_attention.BlockMask`` with the equivalent ``mask_mod``."""
        import torch
        from torch.nn.attention.flex_attention import BlockMask

        def tensor(a):
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            return t.to(device) if device is not None else t

        kv_num = tensor(self.kv_num_blocks)
        return BlockMask.from_kv_blocks(
            kv_num, tensor(self.kv_indices), tensor(self.full_kv_num_blocks),
            tensor(self.full_kv_indices),
            BLOCK_SIZE=(self.q_block_size, self.kv_block_size),
            mask_mod=mask_mod(list(self.layouts), self.q_len, self.kv_len, device=kv_num.device),
            seq_lengths=(self.q_len, self.kv_len),
        )

    def dense_blocks(self) -> np.ndarray:
        """Block classes as an int8 array [B, nq, nk]: 0 empty, 1 partial, 2 full."""
        to_np = (lambda a: a if isinstance(a, np.ndarray) else a.cpu().numpy())
        num, idx = to_np(self.kv_num_blocks)[:, 0], to_np(self.kv_indices)[:, 0]
        fnum, fidx = to_np(self.full_kv_num_blocks)[:, 0], to_np(self.full_kv_indices)[:, 0]
        out = np.zeros(idx.shape, dtype=np.int8)
        for b in range(out.shape[0]):
            for i in range(out.shape[1]):
                out[b, i, idx[b, i, :num[b, i]]] = 1
                out[b, i, fidx[b, i, :fnum[b, i]]] = 2
        return out


def build_block_mask(layouts, block_size: int = 128, q_len: int | None = None,
                     kv_len: int | None = None, *, q_block_size: int | None = None,
                     kv_block_size: int | None = None, device=None) -> SegmentBlockMask:
    """Builds FlexAttention's block format for a batch of layouts.

    Args:
        layouts: a :class:`SegmentLayout` or a list of them (the batch).
        block_size: block size of both axes unless ``q_block_size``/``kv_block_size`` is given.
        q_len, kv_len: lengths of the query and key axes (default: the longest layout). Query i
            sits at position ``i + kv_len - q_len``; positions past a layout's end are masked.
        device: ``None``/``"cpu"`` builds in C on the host (NumPy arrays); a CUDA device builds
            on the GPU from the segment table (torch tensors, no host synchronisation).
    """
    from . import _C
    layouts = as_layout_list(layouts)
    qb = (_check_block("block_size", block_size) if q_block_size is None
          else _check_block("q_block_size", q_block_size))
    kb = (_check_block("block_size", block_size) if kv_block_size is None
          else _check_block("kv_block_size", kv_block_size))
    q_len, kv_len = _lengths(layouts, q_len, kv_len)
    nq, nk = -(-q_len // qb), -(-kv_len // kb)
    batch = len(layouts)
    table = pack_layouts(layouts)
    on_cuda = device is not None and str(device).startswith("cuda")
    if on_cuda:
        import torch
        if not _C.cuda_available():
            raise RuntimeError("segflex was built without CUDA: build_block_mask(device='cuda') "
                               "needs SEGFLEX_CUDA=1 at install time")
        table = table.to(device)
        make = lambda *shape: torch.empty(shape, dtype=torch.int32, device=device)  # noqa: E731
        addr = lambda t: t.data_ptr()  # noqa: E731
        stream = torch.cuda.current_stream(torch.device(device)).cuda_stream
    else:
        if device is not None and str(device) != "cpu":
            raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device!r}")
        make = lambda *shape: np.empty(shape, dtype=np.int32)  # noqa: E731
        addr = lambda a: a.ctypes.data  # noqa: E731
        stream = 0
    num, idx = make(batch, 1, nq), make(batch, 1, nq, nk)
    fnum, fidx = make(batch, 1, nq), make(batch, 1, nq, nk)
    _C.block_mask(*table.c_args(), q_len, kv_len, qb, kb, addr(num), addr(idx), addr(fnum),
                  addr(fidx), on_cuda, stream)
    return SegmentBlockMask(num, idx, fnum, fidx, tuple(layouts), q_len, kv_len, qb, kb)


def _position_tables(layouts: list[SegmentLayout], kv_len: int, device):
    """Per-position segment id, global flag, shared flag and key bias, padded to kv_len."""
    import torch
    batch = len(layouts)
    seg = np.full((batch, kv_len), -1, dtype=np.int32)
    kind = np.full((batch, kv_len), -1, dtype=np.int8)
    bias = np.zeros((batch, kv_len), dtype=np.float32)
    for b, lay in enumerate(layouts):
        ids = lay.segment_ids()
        seg[b, :len(lay)] = ids
        kind[b, :len(lay)] = np.array([KINDS.index(k) for k in lay.kinds], np.int8)[ids]
        bias[b, :len(lay)] = np.asarray(lay.biases, np.float32)[ids]
    lengths = np.array([len(lay) for lay in layouts], dtype=np.int64)
    to = (lambda a: torch.from_numpy(a).to(device))
    return to(seg), to(kind), to(bias), to(lengths)


def mask_mod(layouts, q_len: int | None = None, kv_len: int | None = None, device="cpu"):
    """The FlexAttention ``mask_mod`` of a batch of layouts (see :func:`build_block_mask`)."""
    layouts = as_layout_list(layouts)
    q_len, kv_len = _lengths(layouts, q_len, kv_len)
    seg, kind, _, lengths = _position_tables(layouts, kv_len, device)
    offset = kv_len - q_len

    def segment_mask(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        inside = (pos < lengths[b]) & (kv_idx < lengths[b])
        same = seg[b, pos] == seg[b, kv_idx]
        visible = (kind[b, pos] == GLOBAL) | same | (kind[b, kv_idx] == SHARED)
        return inside & (kv_idx <= pos) & visible

    return segment_mask


def score_mod(layouts, q_len: int | None = None, kv_len: int | None = None, device="cpu"):
    """The FlexAttention ``score_mod`` adding each segment's bias for global queries."""
    layouts = as_layout_list(layouts)
    q_len, kv_len = _lengths(layouts, q_len, kv_len)
    _, kind, bias, _ = _position_tables(layouts, kv_len, device)
    offset = kv_len - q_len

    def segment_bias(score, b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return score + (kind[b, pos] == GLOBAL).to(score.dtype) * bias[b, kv_idx].to(score.dtype)

    return segment_bias


# ----------------------------------------------------------------------------- pictures
def _sample_positions(layout: SegmentLayout, target: int) -> list[int]:
    """Every segment start and end, the first generated position and a few after it, then
    evenly spread positions until about ``target`` positions are shown."""
    L = len(layout)
    if L <= target:
        return list(range(L))
    chosen = set()
    for start, end in zip(layout.starts, layout.ends):
        chosen.update((start, end - 1))
    first_global = _first_generated(layout)
    if first_global is not None:
        chosen.update(range(first_global, min(L, first_global + 4)))
    extra = max(0, target - len(chosen))
    if extra:
        for p in np.linspace(0, L - 1, extra + 2)[1:-1]:
            chosen.add(int(round(p)))
    return sorted(chosen)


def _first_generated(layout: SegmentLayout) -> int | None:
    """Start of the trailing run of global segments (the answer), if the layout has one."""
    start = None
    for s in range(layout.n_segments - 1, -1, -1):
        if layout.kinds[s] != "global":
            break
        start = layout.starts[s]
    return start


def show(layout: SegmentLayout, positions: int = 25, file=None) -> str:
    """Prints the mask of ``layout`` at about ``positions`` sampled positions and returns it.

    Rows are queries, columns keys; ``■`` attends, ``·`` does not. Row markers: ``S#``/``E#``
    the start/end of segment #, ``G0`` the first position of the trailing global part.
    """
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
    pos = _sample_positions(layout, positions)
    mask = layout.dense_mask()
    markers = {}
    for s, (start, end) in enumerate(zip(layout.starts, layout.ends), 1):
        markers.setdefault(end - 1, f"E{s}")
        markers[start] = f"S{s}"
    g0 = _first_generated(layout)
    if g0 is not None:
        markers[g0] = "G0"
    width = max(3, len(str(len(layout) - 1)) + 1)
    lines = [f"Mask {len(layout)}x{len(layout)}: {layout!r}",
             f"showing {len(pos)} positions (rows: queries, columns: keys; ■ attends, · masked)",
             " " * 9 + "".join(f"{p:>{width}}" for p in pos)]
    for q in pos:
        cells = "".join(f"{'■' if mask[q, k] else '·':>{width}}" for k in pos)
        lines.append(f"{markers.get(q, ''):>4}{q:>5}{cells}")
    text = "\n".join(lines)
    print(text, file=file)
    return text


def save_png(layout: SegmentLayout, path, max_pixels: int = 2048, title: str | None = None) -> None:
    """Draws the whole mask of ``layout`` to ``path`` (PNG), segment boundaries in colour.

    Long layouts are reduced to at most ``max_pixels`` per side: a pixel is dark when any
    pair it covers attends.
    """
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mask = layout.dense_mask()
    L = len(layout)
    step = max(1, -(-L // max_pixels))
    if step > 1:
        n = -(-L // step)
        padded = np.zeros((n * step, n * step), dtype=bool)
        padded[:L, :L] = mask
        mask = padded.reshape(n, step, n, step).any(axis=(1, 3))
    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    ax.imshow(mask, cmap="Greys", interpolation="nearest", extent=(0, L, L, 0))
    colours = {"shared": "tab:blue", "isolated": "tab:orange", "global": "tab:green"}
    for start, end, kind in zip(layout.starts, layout.ends, layout.kinds):
        for x in (start, end):
            ax.axhline(x, color=colours[kind], lw=0.6, alpha=0.7)
            ax.axvline(x, color=colours[kind], lw=0.6, alpha=0.7)
        ax.add_patch(plt.Rectangle((start, -L * 0.02), end - start, L * 0.015,
                                   color=colours[kind], clip_on=False))
    handles = [plt.Line2D([], [], color=c, lw=4, label=k) for k, c in colours.items()
               if k in layout.kinds]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    counts = ", ".join(f"{layout.kinds.count(k)} {k}" for k in colours if k in layout.kinds)
    ax.set_title(title or f"{L} tokens: {counts}", fontsize=9, pad=14)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
