"""Segment layouts: the one description of a masked sequence that everything else reads.

A layout cuts a sequence of length L into consecutive segments. Each segment has a
length, a kind and a score bias::

    kind       a query in it may attend to (keys at or before it only)
    shared     earlier shared segments and its own segment
    isolated   earlier shared segments and its own segment
    global     every earlier token

    mask(q, k) = k <= q and (kind(seg(q)) == global or seg(k) == seg(q)
                             or kind(seg(k)) == shared)

A segment's bias is added to the scores of its keys when the query is global
(``-log N`` on N paraphrases gives them together the mass of one).

The self-ensemble layout, prefix shared, paraphrases isolated, answer global::

    keys ->   [BOS+instr+shots+"Q: "][para 1][para 2][para 3]["A:" + generated]
    prefix    ■ causal
    para 1    ■                       ■ causal
    para 2    ■                               ■ causal
    para 3    ■                                       ■ causal
    answer    ■                       ■       ■       ■       ■ causal

(``segflex.show(layout)`` prints the real mask of any layout this way.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

KINDS = ("shared", "isolated", "global")
SHARED, ISOLATED, GLOBAL = 0, 1, 2
POSITION_MODES = ("contiguous", "aligned")


def _check_tokens(name: str, tokens: Sequence[int]) -> list[int]:
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{name} must be a list of token ids, got a string")
    try:
        out = [int(t) for t in tokens]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a list of integer token ids") from None
    return out


class SegmentLayout:
    """The segments of one sequence: lengths, kinds and score biases.

    Args:
        lengths: number of tokens of each segment (positive integers).
        kinds: ``"shared"``, ``"isolated"`` or ``"global"`` for each segment.
        biases: additive score bias of each segment's keys for global queries (default 0).

    Layouts are immutable and hashable; a batch is a list of layouts of any lengths.
    """

    __slots__ = ("_lengths", "_kinds", "_biases", "_ends")

    def __init__(self, lengths: Sequence[int], kinds: Sequence[str],
                 biases: Sequence[float] | None = None) -> None:
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Iterable):
            raise TypeError("lengths must be a sequence of positive integers")
        lengths = list(lengths)
        if not lengths:
            raise ValueError("lengths must not be empty: a layout has at least one segment")
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"lengths[{i}] must be an integer, got {type(n).__name__}")
            if n <= 0:
                raise ValueError(f"lengths[{i}] must be positive, got {n}")
        if isinstance(kinds, str) or not isinstance(kinds, Iterable):
            raise TypeError("kinds must be a sequence of 'shared', 'isolated' or 'global'")
        kinds = list(kinds)
        if len(kinds) != len(lengths):
            raise ValueError(f"kinds has {len(kinds)} entries but lengths has {len(lengths)}")
        for i, kind in enumerate(kinds):
            if kind not in KINDS:
                raise ValueError(f"kinds[{i}] must be one of {KINDS}, got {kind!r}")
        if biases is None:
            biases = [0.0] * len(lengths)
        biases = list(biases)
        if len(biases) != len(lengths):
            raise ValueError(f"biases has {len(biases)} entries but lengths has {len(lengths)}")
        for i, b in enumerate(biases):
            if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
                raise TypeError(f"biases[{i}] must be a number, got {type(b).__name__}")
            if not math.isfinite(float(b)):
                raise ValueError(f"biases[{i}] must be finite, got {b}")
        if sum(int(n) for n in lengths) >= 2**31:
            raise ValueError("lengths add up to 2**31 or more tokens")
        self._lengths = tuple(int(n) for n in lengths)
        self._kinds = tuple(kinds)
        self._biases = tuple(float(b) for b in biases)
        self._ends = tuple(int(e) for e in np.cumsum(self._lengths))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(cls, prefix: Sequence[int], paraphrases: Sequence[Sequence[int]],
                    answer_cue: Sequence[int] = (), *, paraphrase_bias: float = 0.0,
                    generated: int = 0) -> "SegmentLayout":
        """The self-ensemble layout from token id lists, so no text round trip can move a boundary.

        ``[shared: prefix][isolated: p1]...[isolated: pN][global: answer_cue][global: generated]``

        Args:
            prefix: ids shared by every paraphrase (BOS, instruction, few-shot examples, "Q: ").
                May be empty.
            paraphrases: the ids of each paraphrase, one list each (at least one, none empty).
            answer_cue: ids after the paraphrases that every paraphrase feeds (e.g. "\\nA:").
            paraphrase_bias: score bias of the paraphrase keys for global queries; pass
                ``-math.log(len(paraphrases))`` for the 1/N scaling.
            generated: number of generated tokens to include as a final global segment.
        """
        prefix = _check_tokens("prefix", prefix)
        if isinstance(paraphrases, (str, bytes)) or len(paraphrases) == 0:
            raise ValueError("paraphrases must be a non-empty list of token id lists")
        lengths, kinds, biases = [], [], []
        if prefix:
            lengths.append(len(prefix)); kinds.append("shared"); biases.append(0.0)
        for i, p in enumerate(paraphrases):
            ids = _check_tokens(f"paraphrases[{i}]", p)
            if not ids:
                raise ValueError(f"paraphrases[{i}] is empty")
            lengths.append(len(ids)); kinds.append("isolated"); biases.append(float(paraphrase_bias))
        cue = _check_tokens("answer_cue", answer_cue)
        if cue:
            lengths.append(len(cue)); kinds.append("global"); biases.append(0.0)
        if generated < 0:
            raise ValueError(f"generated must be >= 0, got {generated}")
        if generated:
            lengths.append(int(generated)); kinds.append("global"); biases.append(0.0)
        return cls(lengths, kinds, biases)

    @classmethod
    def seed_format(cls, prompts: Sequence[Sequence[int]], separator: Sequence[int] = (), *,
                    bos: Sequence[int] = (), generated: int = 0) -> "SegmentLayout":
        """The earlier system's layout ("format 2"), with its boundary bugs fixed.

        Every paraphrase carries its whole prompt (instruction, few-shot examples, question,
        "A:"); prompts are joined by ``separator`` (the seed used the tokens of
        ``"\\n\\n[SEP]\\n\\n"``), which is attached to the segment before it so that no token
        is left outside a segment. ``bos``, when given, is a one-token shared segment seen by
        every paraphrase (the seed put it inside paraphrase 1 only).

        ``[shared: bos][isolated: prompt1 + sep]...[isolated: promptN][global: generated]``
        """
        if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token id lists")
        sep = _check_tokens("separator", separator)
        bos = _check_tokens("bos", bos)
        lengths, kinds = [], []
        if bos:
            lengths.append(len(bos)); kinds.append("shared")
        for i, p in enumerate(prompts):
            ids = _check_tokens(f"prompts[{i}]", p)
            if not ids:
                raise ValueError(f"prompts[{i}] is empty")
            last = i == len(prompts) - 1
            lengths.append(len(ids) + (0 if last else len(sep))); kinds.append("isolated")
        if generated < 0:
            raise ValueError(f"generated must be >= 0, got {generated}")
        if generated:
            lengths.append(int(generated)); kinds.append("global")
        return cls(lengths, kinds)

    # ------------------------------------------------------------------ properties
    @property
    def lengths(self) -> tuple[int, ...]:
        return self._lengths

    @property
    def kinds(self) -> tuple[str, ...]:
        return self._kinds

    @property
    def biases(self) -> tuple[float, ...]:
        return self._biases

    @property
    def n_segments(self) -> int:
        return len(self._lengths)

    @property
    def starts(self) -> tuple[int, ...]:
        """Position of the first token of each segment."""
        return (0,) + self._ends[:-1]

    @property
    def ends(self) -> tuple[int, ...]:
        """One past the last position of each segment."""
        return self._ends

    def __len__(self) -> int:
        return self._ends[-1]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SegmentLayout) and self._lengths == other._lengths
                and self._kinds == other._kinds and self._biases == other._biases)

    def __hash__(self) -> int:
        return hash((self._lengths, self._kinds, self._biases))

    def __repr__(self) -> str:
        parts = [f"{kind}:{n}" + (f"({bias:+.3g})" if bias else "")
                 for n, kind, bias in zip(self._lengths, self._kinds, self._biases)]
        if len(parts) > 24:  # keep long layouts readable: both ends and a count
            parts = parts[:16] + [f"... {len(parts) - 20} more ..."] + parts[-4:]
        return f"SegmentLayout(L={len(self)}, [{' '.join(parts)}])"

    # ------------------------------------------------------------------ derived views
    def extended(self, n: int) -> "SegmentLayout":
        """This layout followed by ``n`` generated tokens (a global segment of bias 0)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if n == 0:
            return self
        return SegmentLayout(self._lengths + (int(n),), self._kinds + ("global",),
                             self._biases + (0.0,))

    def segment_ids(self) -> np.ndarray:
        """Segment index of every position, int32 [L]."""
        return np.repeat(np.arange(self.n_segments, dtype=np.int32), self._lengths)

    def dense_mask(self) -> np.ndarray:
        """The boolean mask [L, L] (query rows, key columns), straight from the formula."""
        seg = self.segment_ids()
        kind = np.array([KINDS.index(k) for k in self._kinds], dtype=np.int8)[seg]
        pos = np.arange(len(self))
        causal = pos[None, :] <= pos[:, None]
        visible = ((kind[:, None] == GLOBAL) | (seg[:, None] == seg[None, :])
                   | (kind[None, :] == SHARED))
        return causal & visible

    def dense_bias(self) -> np.ndarray:
        """The additive score bias [L, L]: segment bias of the key when the query is global."""
        seg = self.segment_ids()
        is_global = np.array([k == "global" for k in self._kinds])[seg]
        key_bias = np.asarray(self._biases, dtype=np.float32)[seg]
        return np.where(is_global[:, None], key_bias[None, :], 0.0).astype(np.float32)

    def position_ids(self, mode: str = "contiguous") -> np.ndarray:
        """Position ids, int64 [L].

        ``contiguous``: 0 .. L-1. ``aligned``: every isolated segment of a run of isolated
        segments starts at the same position, right after what precedes the run; the tokens
        after the run continue after the longest segment of the run (Parallel Context Windows).
        """
        if mode not in POSITION_MODES:
            raise ValueError(f"mode must be one of {POSITION_MODES}, got {mode!r}")
        from . import _C
        table = pack_layouts([self])
        out = np.empty(len(self), dtype=np.int64)
        _C.position_ids(*table.c_args(), 0, POSITION_MODES.index(mode), len(self),
                        out.ctypes.data)
        return out


@dataclass(frozen=True)
class LayoutTable:
    """A batch of layouts packed into the flat arrays of the C contract (csrc/segflex.h).

    ``seg_ptr`` int32 [B+1], ``seg_end`` int32 [S], ``seg_kind`` uint8 [S],
    ``seg_bias`` float32 [S], ``lengths`` int32 [B]. NumPy arrays, or torch tensors on a
    device after :meth:`to`.
    """

    seg_ptr: object
    seg_end: object
    seg_kind: object
    seg_bias: object
    lengths: object
    host_lengths: tuple[int, ...]

    @property
    def batch(self) -> int:
        return len(self.host_lengths)

    def c_args(self) -> tuple:
        """(batch, seg_ptr, seg_end, seg_kind, seg_bias) as the addresses module.c takes."""
        return (self.batch, _address(self.seg_ptr), _address(self.seg_end),
                _address(self.seg_kind), _address(self.seg_bias))

    def global_from(self, limits: Sequence[int]) -> "LayoutTable":
        """The same table, on the host, with every position of sequence b from ``limits[b]`` on
        turned global (segments split at the limit keep their bias). Decoding uses this: the
        new tokens are queries that see everything, whatever segment the layout puts them in,
        while every key keeps its segment's bias."""
        host = (lambda a: a if isinstance(a, np.ndarray) else a.cpu().numpy())
        ptr, end, kind, bias = (host(a) for a in (self.seg_ptr, self.seg_end, self.seg_kind,
                                                   self.seg_bias))
        ends, kinds, biases, counts = [], [], [], []
        for b in range(len(ptr) - 1):
            start, limit, n = 0, int(limits[b]), 0
            for s in range(int(ptr[b]), int(ptr[b + 1])):
                e = int(end[s])
                if start < limit < e:  # split: the part before the limit keeps its kind
                    ends.append(limit); kinds.append(kind[s]); biases.append(bias[s]); n += 1
                ends.append(e); kinds.append(kind[s] if e <= limit else GLOBAL)
                biases.append(bias[s]); n += 1
                start = e
            counts.append(n)
        seg_ptr = np.zeros(len(counts) + 1, dtype=np.int32)
        seg_ptr[1:] = np.cumsum(counts)
        return LayoutTable(seg_ptr, np.array(ends, dtype=np.int32), np.array(kinds, dtype=np.uint8),
                           np.array(biases, dtype=np.float32), self.lengths, self.host_lengths)

    def to(self, device) -> "LayoutTable":
        """The same table as torch tensors on ``device``."""
        import torch
        conv = (lambda a: a.to(device) if isinstance(a, torch.Tensor)
                else torch.from_numpy(a).to(device))
        return LayoutTable(conv(self.seg_ptr), conv(self.seg_end), conv(self.seg_kind),
                           conv(self.seg_bias), conv(self.lengths), self.host_lengths)


def _address(a) -> int:
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return a.data_ptr()


def as_layout_list(layouts, name: str = "layouts") -> list[SegmentLayout]:
    """Accepts one layout or a sequence of them; raises naming ``name`` otherwise."""
    if isinstance(layouts, SegmentLayout):
        return [layouts]
    if isinstance(layouts, (str, bytes)) or not isinstance(layouts, Iterable):
        raise TypeError(f"{name} must be a SegmentLayout or a list of them")
    layouts = list(layouts)
    if not layouts:
        raise ValueError(f"{name} must not be empty")
    for i, lay in enumerate(layouts):
        if not isinstance(lay, SegmentLayout):
            raise TypeError(f"{name}[{i}] must be a SegmentLayout, got {type(lay).__name__}")
    return layouts


def pack_layouts(layouts) -> LayoutTable:
    """Packs a batch of layouts into a :class:`LayoutTable` of NumPy arrays."""
    layouts = as_layout_list(layouts)
    counts = [lay.n_segments for lay in layouts]
    seg_ptr = np.zeros(len(layouts) + 1, dtype=np.int32)
    seg_ptr[1:] = np.cumsum(counts)
    seg_end = np.fromiter((e for lay in layouts for e in lay.ends), np.int32, seg_ptr[-1])
    seg_kind = np.fromiter((KINDS.index(k) for lay in layouts for k in lay.kinds), np.uint8,
                           seg_ptr[-1])
    seg_bias = np.fromiter((b for lay in layouts for b in lay.biases), np.float32, seg_ptr[-1])
    lengths = np.array([len(lay) for lay in layouts], dtype=np.int32)
    return LayoutTable(seg_ptr, seg_end, seg_kind, seg_bias, lengths,
                       tuple(int(n) for n in lengths))
