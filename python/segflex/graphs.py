"""One decode step of a transformers model, captured once in a CUDA graph and replayed.

A decode step of a 3B model is a few hundred small kernels; launched one by one from
Python it costs about ten times what the GPU needs to read the weights. The step is
therefore captured once per (model, batch, cache size) and replayed for every token of
every later call with the same sizes:

* the KV cache buffers, the segment table and the step's inputs (new token, position,
  write position) live at fixed addresses, owned by a :class:`GraphedDecoder`;
* the graph itself advances the write positions and the position ids, so the host only
  writes the chosen tokens before each replay;
* a new batch of questions re-uses everything: its prefill writes into the same cache
  buffers and its layouts are copied into the same table buffers (capacity rounded up,
  trailing entries unused; the table's row pointers say where each row's segments are).

Decoders are kept per model in a small least-recently-used store (:func:`decoder_for`);
:func:`release` drops them and their memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .hf import SegmentCache, cache_keyword
from .layout import LayoutTable

__all__ = ["GraphedDecoder", "decoder_for", "release", "CACHE_ROUNDING", "MAX_DECODERS"]

CACHE_ROUNDING = 256  # cache lengths are rounded up to this, so nearby sizes share a graph
MAX_DECODERS = 2      # decoders kept per model (each holds a whole KV cache)
_ATTR = "_segflex_decoders"


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _capacity(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


class GraphedDecoder:
    """Static buffers and the captured decode step for one batch size and cache length."""

    def __init__(self, base: Any, head: Any, num_layers: int, batch: int, max_len: int,
                 device: torch.device) -> None:
        self.base, self.head = base, head
        self.batch, self.max_len, self.device = batch, max_len, device
        self.cache = SegmentCache(num_layers, max_len)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.write_at = torch.zeros(batch, dtype=torch.long, device=device)  # = cache length
        self.rows = torch.arange(batch, device=device)
        self.table: LayoutTable | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    # -- per call
    def reset(self) -> None:
        """Ready the cache for a new prefill (its buffers are kept)."""
        c = self.cache
        c.lens, c._pending, c._mode, c._start, c._index, c._offset = None, None, "prefill", None, None, 0

    def load_table(self, table: LayoutTable) -> None:
        """Copies a packed table into the static table buffers (growing them, and dropping
        the graph, when it does not fit)."""
        n = int(table.seg_end.shape[0])
        if self.table is None or self.table.seg_end.shape[0] < n:
            cap = _capacity(n)
            dev = self.device
            self.table = LayoutTable(
                torch.zeros(self.batch + 1, dtype=torch.int32, device=dev),
                torch.zeros(cap, dtype=torch.int32, device=dev),
                torch.zeros(cap, dtype=torch.uint8, device=dev),
                torch.zeros(cap, dtype=torch.float32, device=dev),
                torch.zeros(self.batch, dtype=torch.int32, device=dev), table.host_lengths)
            self.graph = None  # it holds the old addresses
        t = self.table
        t.seg_ptr.copy_(table.seg_ptr)
        t.seg_end[:n].copy_(table.seg_end)
        t.seg_kind[:n].copy_(table.seg_kind)
        t.seg_bias[:n].copy_(table.seg_bias)
        t.lengths.copy_(table.lengths)

    def start(self, cache_lens: torch.Tensor, next_position: torch.Tensor) -> None:
        """Call after the prefill: where the first new token goes and its position id."""
        self.write_at.copy_(cache_lens)
        self.position.copy_(next_position)
        c = self.cache
        c._mode, c._start, c._step = "decode", self.write_at, 1
        if self.graph is None:
            self._capture()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Runs one decode step for ``token`` [batch]; returns float32 logits [batch, vocab]
        (a static buffer, overwritten by the next step)."""
        self.token.copy_(token)
        self.graph.replay()
        return self.logits

    # -- the captured work
    def _forward(self) -> torch.Tensor:
        self.cache._index = None  # write rows: computed in the step (the graph) from write_at
        lens = (self.write_at + 1).to(torch.int32)
        hidden = self.base(input_ids=self.token[:, None], position_ids=self.position[:, None],
                           **{cache_keyword(self.base): self.cache}, use_cache=True, segment_layouts=self.table,
                           cache_lens=lens).last_hidden_state
        return self.head(hidden[:, -1]).float()

    def _capture(self) -> None:
        # Warm-up on a side stream (library handles, workspaces, lazy inits), as CUDA graph
        # capture requires. It writes the same keys at the same place as the first real step
        # will, so it changes nothing.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward()
            self.write_at.add_(1)
            self.position.add_(1)
        self.graph = graph


def decoder_for(model: Any, base: Any, head: Any, batch: int, cache_len: int) -> GraphedDecoder:
    """The model's decoder for this batch size and a cache of at least ``cache_len``
    (made, and the least recently used one dropped, when missing)."""
    store: OrderedDict = model.__dict__.setdefault(_ATTR, OrderedDict())
    device = head.weight.device
    max_len = _round_up(cache_len, CACHE_ROUNDING)
    key = (batch, max_len, str(device))
    dec = store.pop(key, None)
    if dec is None:
        while len(store) >= MAX_DECODERS:
            store.popitem(last=False)
        dec = GraphedDecoder(base, head, model.config.num_hidden_layers, batch, max_len, device)
    store[key] = dec
    dec.reset()
    return dec


def release(model: Any) -> None:
    """Drops the model's captured decode steps and their caches."""
    model.__dict__.pop(_ATTR, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
