"""Hugging Face transformers integration: ``attn_implementation="segflex"``.

Importing this module registers ``"segflex"`` with transformers' attention
interface and attention-mask interface, so that::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="segflex")
    model.set_attn_implementation("segflex")
    with segflex.hf.enable(model):          # switch a loaded model, restore on exit
        ...

all work. Segment layouts reach the attention function as forward keywords,
which transformers passes unchanged from the model's ``forward`` down to every
attention call::

    model(input_ids, position_ids=pos, segment_layouts=[layout_0, layout_1, ...])

* With ``segment_layouts`` (one :class:`segflex.SegmentLayout` per batch row,
  rows right-padded) a prefill runs :func:`segflex.attention` with those
  layouts. With ``cache_lens`` as well (the valid cache length of each row,
  the new tokens included; see :class:`SegmentCache`) the call is a decode step
  and runs :func:`segflex.decode` over the cache.
* Without layouts the model behaves exactly like plain causal attention
  (right padding through ``attention_mask`` is honoured). Anything segflex
  cannot express (left padding, a sliding window shorter than the sequence,
  packed sequences detected from ``position_ids``, custom mask overlays,
  dropout, logit soft-capping, attention sinks) raises a ``ValueError`` that
  says why: there is no silent fallback to another attention.

Why a mask function is registered too: transformers drops the user's 2D
``attention_mask`` for attention implementations it has no mask function for,
and for the ones it knows it builds a dense mask from ``position_ids``
heuristics (aligned positions look like packed sequences to it). segflex's
mask function builds nothing: it records what transformers would have built,
and the attention function checks that record only when no layouts are given.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

NAME = "segflex"

__all__ = [
    "NAME",
    "register",
    "enable",
    "segflex_attention_forward",
    "segflex_mask",
    "SegmentCache",
    "cache_keyword",
]


# ---------------------------------------------------------------- mask record


@dataclass
class SegflexMaskInfo:
    """What transformers asked the mask interface for, kept for the attention
    function. Built once per forward and shared by every layer; the result of
    the (lazy) plain-causal check is cached on it for the same reason."""

    kwargs: dict
    plain_causal: bool
    padding: Optional[torch.Tensor]
    _checked: Optional[object] = field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        # Some model code inspects ``attention_mask.shape``; a 0-d shape keeps
        # such code from mistaking this record for a dense mask.
        return ()


def segflex_mask(
    batch_size: int,
    *args: Any,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> SegflexMaskInfo:
    """Attention-mask interface entry for ``"segflex"``: record, do not build.

    Takes the keywords transformers passes to every mask function (they differ
    between transformers 4.5x and 5.x, hence ``**kwargs``).
    """
    from transformers import masking_utils

    if args:
        raise TypeError(f"segflex_mask: unexpected positional arguments {args!r}")
    causal = getattr(masking_utils, "causal_mask_function", None)
    plain = mask_function is None or mask_function is causal
    record = dict(kwargs, batch_size=batch_size, attention_mask=attention_mask)
    if mask_function is not None:
        record["mask_function"] = mask_function
    padding = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
    return SegflexMaskInfo(kwargs=record, plain_causal=plain, padding=padding)


# ------------------------------------------------------------------ helpers


def _layout_cls():
    from segflex import SegmentLayout

    return SegmentLayout


def _causal_layouts(lengths: Sequence[int]) -> list:
    """One global segment per row: the plain causal mask over its tokens."""
    SegmentLayout = _layout_cls()
    return [SegmentLayout(lengths=[int(n)], kinds=["global"]) for n in lengths]


def _right_padded_lengths(padding: torch.Tensor) -> list[int]:
    """Valid length of each row of a 2D padding mask that must be a prefix of
    ones (right padding); anything else raises."""
    pad = padding.to(torch.bool)
    lengths = pad.sum(dim=1)
    expected = torch.arange(pad.shape[1], device=pad.device)[None, :] < lengths[:, None]
    if not torch.equal(pad, expected):
        raise ValueError(
            "segflex: attention_mask has padding that is not right padding (left padding or holes); "
            "segflex places every sequence at positions 0..n-1, so pad on the right or pass segment_layouts"
        )
    out = [int(n) for n in lengths.tolist()]
    if min(out) == 0:
        raise ValueError(f"segflex: attention_mask row {out.index(0)} has no valid token")
    return out


def _plain_causal_lengths(info: Any, batch: int, q_len: int, kv_len: int) -> list[int]:
    """For a forward without layouts: the number of valid keys of each row,
    after checking that transformers' mask for this call is plain causal
    (with at most right padding). Raises with the reason otherwise."""
    if info is None:
        return [kv_len] * batch
    if isinstance(info, torch.Tensor):
        if info.ndim == 2:  # transformers without a mask interface passes the 2D mask through
            if info.shape[-1] != kv_len:
                raise ValueError(
                    f"segflex: attention_mask has {info.shape[-1]} columns for {kv_len} keys"
                )
            lengths = _right_padded_lengths(info)
            if q_len != kv_len and min(lengths) != kv_len:
                raise ValueError("segflex: right padding together with a KV cache is not supported")
            return lengths
        raise TypeError(
            f"segflex: attention_mask is a {info.ndim}D tensor; segflex does not take dense masks, "
            "pass segment_layouts to describe the mask"
        )
    if not isinstance(info, SegflexMaskInfo):
        raise TypeError(f"segflex: attention_mask of type {type(info).__name__} is not supported")
    if info._checked is not None:
        return info._checked  # type: ignore[return-value]

    lengths = [kv_len] * batch
    pad = info.padding
    if pad is not None and not bool(pad.all()):
        if pad.shape[-1] != kv_len:
            raise ValueError(f"segflex: attention_mask has {pad.shape[-1]} columns for {kv_len} keys")
        lengths = _right_padded_lengths(pad)
        if q_len != kv_len:
            raise ValueError("segflex: right padding together with a KV cache is not supported")
    if not info.plain_causal:
        # Materialise what transformers would have used and compare it with the
        # plain causal mask of the same sizes and padding (done once per forward).
        from transformers import masking_utils

        built = masking_utils.sdpa_mask(**dict(info.kwargs, allow_is_causal_skip=False))
        plain = masking_utils.sdpa_mask(
            **dict(info.kwargs, allow_is_causal_skip=False, mask_function=masking_utils.causal_mask_function)
        )
        if built is None or plain is None or built.shape != plain.shape:
            raise ValueError("segflex: could not check the mask transformers built for this call")
        for b in range(built.shape[0]):
            rows = slice(0, q_len - (kv_len - lengths[b])) if q_len == kv_len else slice(None)
            if not torch.equal(built[b, :, rows], plain[b, :, rows]):
                raise ValueError(
                    "segflex: the mask this model needs here is not plain causal (a sliding window "
                    "shorter than the sequence, packed sequences detected from position_ids, or a custom "
                    "mask overlay); pass segment_layouts to say what the mask is"
                )
    info._checked = lengths
    return lengths


# ---------------------------------------------------------- attention function


def segflex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    segment_layouts: Optional[Sequence[Any]] = None,
    cache_lens: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function for ``"segflex"``.

    ``query`` is ``[B, Hq, Lq, D]``, ``key``/``value`` ``[B, Hkv, Lk, D]``
    (GQA is handled by segflex without repeating K/V). Returns the output as
    ``[B, Lq, Hq, D]`` and no attention weights.

    ``segment_layouts``: one layout per row (or a single one for every row).
    ``cache_lens``: int tensor ``[B]``, valid cache length of each row including
    the ``Lq`` new tokens; makes the call a decode step over ``key``/``value``
    (the whole static cache buffers).
    """
    import segflex

    if dropout and module.training:
        raise ValueError("segflex: attention dropout is not supported (use model.eval())")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"segflex: attention keyword {name!r} (logit soft-capping / sinks) is not supported")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError("segflex: bidirectional (non-causal) attention is not supported")

    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    window = kwargs.get("sliding_window")

    if segment_layouts is not None:
        layouts, layout_lengths = _as_layouts(segment_layouts, batch)
        if isinstance(attention_mask, SegflexMaskInfo) and attention_mask.padding is not None:
            _check_padding_matches(attention_mask.padding, layout_lengths, cache_lens)
        elif isinstance(attention_mask, torch.Tensor):
            raise TypeError("segflex: pass either segment_layouts or a dense attention_mask, not both")
        # (only read for the sliding-window check: cache_lens may live on the GPU)
        longest = (lambda: int(cache_lens.max())) if cache_lens is not None else (lambda: max(layout_lengths))
    else:
        layouts = None
        lengths = _plain_causal_lengths(attention_mask, batch, q_len, kv_len)
        longest = lambda: max(lengths)  # noqa: E731
        if cache_lens is None and q_len < kv_len and q_len <= 8:
            cache_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=query.device)
            # one-token global layouts: no bias anywhere (the cache is the implicit global tail)
            layouts = _causal_layouts([1] * batch)
        elif cache_lens is None:
            layouts = _causal_layouts(lengths)

    if window is not None and longest() > int(window):
        raise ValueError(
            f"segflex: the model uses a sliding window of {window} tokens and a sequence has {longest()}; "
            "sliding-window attention is not supported"
        )

    if cache_lens is not None:
        if not isinstance(cache_lens, torch.Tensor):
            cache_lens = torch.as_tensor(cache_lens, dtype=torch.int32)
        if cache_lens.shape != (batch,):
            raise ValueError(f"cache_lens has shape {tuple(cache_lens.shape)}, expected ({batch},)")
        if q_len > 8:
            raise ValueError(f"segflex: a decode step takes 1..8 new tokens per row, got {q_len}")
        out = segflex.decode(query, key, value, cache_lens, layouts=layouts, scale=scaling)
    else:
        # q_len < kv_len: a prefill after cached keys; query i sits at position i + kv_len - q_len.
        if max(_as_layouts(layouts, batch)[1]) > kv_len:
            raise ValueError(f"segflex: a layout is longer than the {kv_len} keys of this call")
        out = segflex.attention(query, key, value, layouts, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _as_layouts(segment_layouts: Any, batch: int) -> tuple[Any, list[int]]:
    """The layouts to hand to segflex (a list, or a packed ``LayoutTable`` as
    is) and the length of each; checks there is one per row."""
    from segflex.layout import LayoutTable, SegmentLayout

    if isinstance(segment_layouts, LayoutTable):
        lengths = list(segment_layouts.host_lengths)
        layouts = segment_layouts
    elif isinstance(segment_layouts, SegmentLayout):
        layouts = [segment_layouts] * batch
        lengths = [len(segment_layouts)] * batch
    elif isinstance(segment_layouts, (list, tuple)):
        layouts = list(segment_layouts)
        for i, lay in enumerate(layouts):
            if not isinstance(lay, SegmentLayout):
                raise TypeError(f"segment_layouts[{i}] must be a SegmentLayout, got {type(lay).__name__}")
        lengths = [len(lay) for lay in layouts]
    else:
        raise TypeError(
            "segment_layouts must be a SegmentLayout, a list of them or a LayoutTable, "
            f"got {type(segment_layouts).__name__}"
        )
    if len(lengths) != batch:
        raise ValueError(f"segment_layouts has {len(lengths)} layouts for a batch of {batch}")
    return layouts, lengths


def _check_padding_matches(padding: torch.Tensor, layout_lengths: list[int], cache_lens: Any) -> None:
    """A 2D attention_mask given with layouts must agree with their lengths."""
    if cache_lens is not None or bool(padding.all()):
        return
    lengths = _right_padded_lengths(padding)
    if lengths != layout_lengths:
        raise ValueError(
            f"segflex: attention_mask row lengths {lengths} disagree with the layout lengths {layout_lengths}"
        )


# --------------------------------------------------------------- registration

_registered = False


def register() -> None:
    """Register ``"segflex"`` with transformers (idempotent; done on import)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
    except ImportError as exc:  # pragma: no cover - very old transformers
        raise ImportError("segflex.hf needs transformers >= 4.48 (AttentionInterface)") from exc
    AttentionInterface.register(NAME, segflex_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53: masks are built by the model, 2D masks pass through
        AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(NAME, segflex_mask)
    _registered = True


class enable(contextlib.AbstractContextManager):
    """Switch a loaded model to segflex attention now; restore on exit.

    ``segflex.hf.enable(model)`` switches for good; ``with
    segflex.hf.enable(model): ...`` switches back to the previous
    implementation when the block ends (also on error).
    """

    def __init__(self, model: Any) -> None:
        register()
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError("enable: model has no config (expected a transformers PreTrainedModel)")
        self.model = model
        self.previous = getattr(config, "_attn_implementation", None)
        _set_implementation(model, NAME)

    def restore(self) -> None:
        """Put the previous attention implementation back."""
        if self.previous is not None:
            _set_implementation(self.model, self.previous)

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _set_implementation(model: Any, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
        return
    # Older transformers: set the (internal) attribute on every config in the model.
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            config._attn_implementation = name


# ---------------------------------------------------------------------- cache


class SegmentCache:
    """A static KV cache with one write position per row.

    Buffers are ``[B, Hkv, max_len, D]`` per layer, allocated at the first
    write. Rows of a batch have different lengths, so instead of transformers'
    shared ``cache_position`` each row keeps its own length ``lens[b]``:

    * prefill (``begin_prefill(lengths)`` then one forward): keys of the padded
      prompt batch land at positions ``0..Lmax-1``; the call gets the prompt
      keys back (queries and keys have the same length);
    * prefill after a shared prefix (``put_prefix(...)``, then
      ``begin_prefill(lengths, offset=P)`` and a forward of the tokens after
      the first P): keys land at ``P..``; the call gets keys ``0..`` so its
      queries sit at the end of a longer key range (chunked prefill);
    * decode (``begin_decode()`` then one forward with ``cache_lens=
      cache.next_lens``): the new token of row b lands at ``lens[b]``; the call
      gets the whole buffers and ``segflex.decode`` reads ``cache_lens`` of each.

    ``advance()`` after every forward commits the new lengths. Only the
    methods transformers' model code calls on a cache are provided.
    """

    is_compileable = False
    is_sliding = ()

    def __init__(self, num_layers: int, max_len: int) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.num_layers = num_layers
        self.max_len = max_len
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.lens: Optional[torch.Tensor] = None
        self._pending: Optional[torch.Tensor] = None
        self._mode = "prefill"
        self._step = 1
        self._start: Optional[torch.Tensor] = None
        self._index: Optional[torch.Tensor] = None
        self._offset = 0

    # -- engine side
    def begin_prefill(self, lengths: torch.Tensor, offset: int = 0) -> None:
        """The next forward writes a right-padded prompt batch of these lengths (whole
        lengths; with ``offset``, the forward carries only the tokens after the first
        ``offset``, whose keys :meth:`put_prefix` already stored)."""
        if int(lengths.max()) > self.max_len:
            raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit max_len={self.max_len}")
        self._mode, self._pending = "prefill", lengths.to("cpu", torch.int64)
        self._offset = offset

    def begin_decode(self, n_new: int = 1) -> torch.Tensor:
        """The next forward writes ``n_new`` tokens per row; returns the
        ``cache_lens`` to pass to the model (lengths including them)."""
        if self.lens is None:
            raise ValueError("begin_decode: the cache is empty (run a prefill first)")
        if int(self.lens.max()) + n_new > self.max_len:
            raise ValueError(f"the cache is full (max_len={self.max_len})")
        self._mode, self._step = "decode", n_new
        self._pending = self.lens + n_new
        self._start = None  # write positions on the cache's device, made once per step
        self._index = None
        return self._pending.to(torch.int32)

    def put_prefix(self, prefix: "SegmentCache", batch: int) -> None:
        """Copies the keys/values of a one-row cache holding a shared prefix into the first
        positions of ``batch`` rows of this cache."""
        for i in range(self.num_layers):
            pk, pv = prefix.keys[i], prefix.values[i]
            n = int(prefix.lens[0])
            if self.keys[i] is None:
                shape = (batch, pk.shape[1], self.max_len, pk.shape[3])
                self.keys[i], self.values[i] = pk.new_zeros(shape), pv.new_zeros(shape)
            self.keys[i][:, :, :n] = pk[:1, :, :n]
            self.values[i][:, :, :n] = pv[:1, :, :n]

    def advance(self) -> None:
        """Commit the lengths of the forward that just ran."""
        self.lens = self._pending

    def repeat_rows(self, repeats: int) -> None:
        """Each row becomes ``repeats`` consecutive identical rows (samples of one prompt)."""
        if repeats == 1:
            return
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].repeat_interleave(repeats, dim=0)
                self.values[i] = self.values[i].repeat_interleave(repeats, dim=0)
        if self.lens is not None:
            self.lens = self.lens.repeat_interleave(repeats)

    def fill_from(self, source: "SegmentCache", repeats: int = 1) -> None:
        """Copies the keys, values and lengths of ``source`` into this cache's buffers (kept
        where they exist), each row of ``source`` becoming ``repeats`` consecutive rows."""
        if source.lens is None:
            raise ValueError("fill_from: the source cache is empty")
        n = int(source.lens.max())
        if n > self.max_len:
            raise ValueError(f"fill_from: {n} cached tokens do not fit max_len={self.max_len}")
        for i in range(self.num_layers):
            for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
                src = theirs[i]
                rows = src.shape[0] * repeats
                if mine[i] is None or mine[i].shape[0] != rows:
                    mine[i] = src.new_zeros((rows, src.shape[1], self.max_len, src.shape[3]))
                view = mine[i].view(src.shape[0], repeats, *mine[i].shape[1:])
                view[:, :, :, :n] = src[:, None, :, :n]
        self.lens = source.lens.repeat_interleave(repeats)
        self._pending, self._start = None, None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keeps only the rows ``index`` (in that order): finished rows leave the batch."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                at = index.to(self.keys[i].device)
                self.keys[i] = self.keys[i].index_select(0, at)
                self.values[i] = self.values[i].index_select(0, at)
        if self.lens is not None:
            self.lens = self.lens.index_select(0, index.to(self.lens.device))
        self._start = None

    # -- model side
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None,
               **kwargs: Any):
        # (transformers passes its extra arguments as cache_kwargs, or as kwargs= in releases
        # such as 5.25; neither is needed: the write positions come from begin_prefill /
        # begin_decode)
        batch, heads, n, dim = key.shape
        if self.keys[layer_idx] is None:
            shape = (batch, heads, self.max_len, dim)
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        if kbuf.shape[0] != batch:
            raise ValueError(f"SegmentCache holds {kbuf.shape[0]} rows, the forward has {batch}")
        if self._mode == "prefill":
            o = self._offset
            kbuf[:, :, o:o + n] = key
            vbuf[:, :, o:o + n] = value
            return (key, value) if o == 0 else (kbuf[:, :, :o + n], vbuf[:, :, :o + n])
        if self._start is None or self._start.device != key.device:
            self._start = self.lens.to(key.device)
            self._index = None
        if self._index is None:  # made by the first layer, used by all (the same shapes)
            self._index = _write_index(self._start, heads, self.max_len, n)
        kbuf.view(-1, dim).index_copy_(0, self._index, key.reshape(-1, dim))
        vbuf.view(-1, dim).index_copy_(0, self._index, value.reshape(-1, dim))
        return kbuf, vbuf

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.lens is None else int(self.lens.max())

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_mask_sizes(self, query: Any, layer_idx: int = 0) -> tuple[int, int]:
        # Only consulted by transformers' mask preprocessing, whose result
        # segflex ignores when layouts are given.
        q_len = query if isinstance(query, int) else int(query.shape[-1])
        return (q_len if self._mode == "prefill" else self.max_len), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0 if self.lens is None or self._mode == "prefill" else int(self.lens.max())

    def __len__(self) -> int:
        return self.num_layers


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a KV cache such as
    :class:`SegmentCache`: ``cache`` in transformers releases that renamed it,
    ``past_key_values`` before."""
    return _cache_keyword(type(model))


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _write_index(start: torch.Tensor, heads: int, max_len: int, n: int) -> torch.Tensor:
    """Rows of a [B*heads*max_len, D] view of a cache buffer where the n new tokens of every
    (row b, head h) go: (b*heads + h)*max_len + start[b] + j, in the order of
    key.reshape(-1, D) for a [B, heads, n, D] key."""
    batch = start.shape[0]
    bh = torch.arange(batch * heads, device=start.device).view(batch, heads, 1) * max_len
    return (bh + start.view(batch, 1, 1) + torch.arange(n, device=start.device)).reshape(-1)


register()
