"""Self-ensemble generation and its baselines, KV-cached and batched.

A question is a shared prefix (instruction, few-shot examples, ``"Q:"``), N
paraphrases and an answer cue (``"\\nA:"``), all as token id lists: pieces are
tokenised on their own and concatenated, never decoded and tokenised again,
and the BOS token appears once, at the very start.

Every method runs through one engine (:func:`generate_rows`): ONE masked
prefill of a right-padded batch of rows of different lengths, then decode
steps over a static KV cache with a write position per row
(:class:`segflex.hf.SegmentCache`). A *group* of rows picks one token per
step, appended to all its rows:

* ``self_ensemble`` (alias ``flex``): one row per question, the paraphrases in
  isolated segments (layout formats ``"shared"`` and ``"seed"``, position modes
  ``"contiguous"`` and ``"aligned"``, paraphrase bias 0 or ``-log N``);
* ``origin`` (paraphrase 0 alone) and ``per_prompt`` (each paraphrase alone);
* logit fusion, the N paraphrase prompts of a question as the rows of one
  group: ``avg`` (argmax of the mean raw logits), ``max`` (argmax of the
  element-wise max of the softmax), ``weighted_avg`` (raw logits weighted by
  confidences normalised per question) and ``weighted_max`` (the most
  confident paraphrase alone), confidences from :func:`self_consistency`.

Each group stops on its own at EOS or at a token whose text contains a
newline; the prediction is the first line of the generation, stripped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .graphs import decoder_for
from .hf import SegmentCache, cache_keyword, enable
from .layout import SegmentLayout
from .ops import pack

__all__ = [
    "Question",
    "Generation",
    "ConfidenceRecord",
    "Row",
    "METHODS",
    "encode_question",
    "self_ensemble_row",
    "generate_rows",
    "generate",
    "run_method",
    "self_consistency",
    "partial_match",
    "default_normalize",
]

METHODS = ("self_ensemble", "flex", "origin", "per_prompt", "avg", "max", "weighted_avg", "weighted_max")
FORMATS = ("shared", "seed")
POSITION_MODES = ("contiguous", "aligned")


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Question:
    """One question as token ids.

    The single-paraphrase prompt i is ``bos + prefix + paraphrases[i] +
    answer_cue``; the self-ensemble sequence is ``bos + prefix + p1 + ... + pN
    + answer_cue``.
    """

    prefix: tuple[int, ...]
    paraphrases: tuple[tuple[int, ...], ...]
    answer_cue: tuple[int, ...] = ()
    bos: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", tuple(int(t) for t in self.prefix))
        object.__setattr__(self, "paraphrases", tuple(tuple(int(t) for t in p) for p in self.paraphrases))
        object.__setattr__(self, "answer_cue", tuple(int(t) for t in self.answer_cue))
        object.__setattr__(self, "bos", tuple(int(t) for t in self.bos))
        if not self.paraphrases:
            raise ValueError("paraphrases must hold at least one paraphrase")
        for i, p in enumerate(self.paraphrases):
            if not p:
                raise ValueError(f"paraphrases[{i}] is empty")

    @property
    def n(self) -> int:
        return len(self.paraphrases)

    def prompt(self, i: int) -> list[int]:
        """Token ids of the single-paraphrase prompt of paraphrase ``i``."""
        return list(self.bos + self.prefix + self.paraphrases[i] + self.answer_cue)


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before the text (BOS), found by comparing
    an encoding with and without special tokens."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def encode_question(
    tokenizer: Any,
    prefix: str,
    paraphrases: Sequence[str],
    answer_cue: str = "\nA:",
    *,
    add_bos: bool = True,
    move_trailing_space: bool = True,
) -> Question:
    """Tokenise the pieces of a question separately (no special tokens) and
    put the tokenizer's BOS, if it has one, once in front.

    ``move_trailing_space``: a prefix ending in a space (``"...Q: "``) gives
    most BPE vocabularies a lone space token, while the full prompt would merge
    the space into the paraphrase's first word; the space is therefore moved
    to the start of every paraphrase. The text is unchanged.
    """
    if isinstance(paraphrases, str):
        raise TypeError("paraphrases must be a list of strings, got one string")

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    lead = ""
    if move_trailing_space and prefix.endswith(" "):
        stripped = prefix.rstrip(" ")
        lead, prefix = prefix[len(stripped) :], stripped
    bos = tuple(_leading_special_ids(tokenizer)) if add_bos else ()
    return Question(ids(prefix), tuple(ids(lead + p) for p in paraphrases), ids(answer_cue), bos)


@dataclass
class Row:
    """One sequence of the engine: tokens, their layout and position ids."""

    tokens: list[int]
    layout: SegmentLayout
    positions: np.ndarray


def _plain_row(tokens: Sequence[int]) -> Row:
    tokens = list(tokens)
    return Row(tokens, SegmentLayout([len(tokens)], ["global"]), np.arange(len(tokens), dtype=np.int64))


def _bias_value(paraphrase_bias: Union[float, str], n: int) -> float:
    if isinstance(paraphrase_bias, str):
        if paraphrase_bias not in ("-log_n", "log_n"):
            raise ValueError(f"paraphrase_bias must be a number or '-log_n', got {paraphrase_bias!r}")
        return -math.log(n)
    return float(paraphrase_bias)


def self_ensemble_row(
    question: Question,
    format: str = "shared",
    positions: str = "aligned",
    paraphrase_bias: Union[float, str] = "-log_n",
    separator: Sequence[int] = (),
) -> Row:
    """The single masked sequence of a question.

    ``format="shared"``: ``[shared: bos+prefix][isolated p1..pN][global cue]``.
    ``format="seed"``: ``[shared: bos][isolated: prefix+p1+cue+separator]...
    [isolated: prefix+pN+cue]`` (the earlier system's full prompts, repeated).
    ``paraphrase_bias``: a number, or ``"-log_n"`` for ``-log N``; it applies to
    the isolated segments. Generated tokens are global and continue from the
    last position + 1.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    bias = _bias_value(paraphrase_bias, question.n)
    if format == "shared":
        shared = list(question.bos + question.prefix)
        layout = SegmentLayout.from_tokens(
            shared, [list(p) for p in question.paraphrases], list(question.answer_cue), paraphrase_bias=bias
        )
        tokens = shared + [t for p in question.paraphrases for t in p] + list(question.answer_cue)
    else:
        prompts = [list(question.prefix + p + question.answer_cue) for p in question.paraphrases]
        sep = list(separator)
        seed = SegmentLayout.seed_format(prompts, sep, bos=list(question.bos))
        biases = [bias if kind == "isolated" else 0.0 for kind in seed.kinds]
        layout = SegmentLayout(seed.lengths, seed.kinds, biases)
        tokens = list(question.bos)
        for i, p in enumerate(prompts):
            tokens += p + (sep if i < len(prompts) - 1 else [])
    if len(tokens) != len(layout):
        raise AssertionError("layout and tokens disagree")  # would be a bug here, not user input
    return Row(tokens, layout, layout.position_ids(positions))


# ------------------------------------------------------------------ outputs


@dataclass
class Generation:
    """What one group of rows produced."""

    tokens: list[int]
    generation: str
    prediction: str


@dataclass
class ConfidenceRecord:
    """Self-consistency of one paraphrase prompt."""

    greedy: str
    samples: list[str]
    confidence: float


def first_line(text: str) -> str:
    """The prediction: the first line of the stripped generation, stripped."""
    return text.strip().split("\n")[0].strip()


# ------------------------------------------------------------------ the engine


_STOP_CACHE: dict = {}


def _stop_ids(tokenizer: Any, model: Any, vocab: int) -> tuple[set, set]:
    """(stop ids, EOS ids): EOS of the tokenizer and of the model's generation
    config, and every token whose text contains a newline. No tokenizer: none."""
    if tokenizer is None:
        return set(), set()
    key = (id(tokenizer), vocab)
    if key not in _STOP_CACHE:
        n = min(vocab, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        eos = set()
        for source in (getattr(tokenizer, "eos_token_id", None),
                       getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if source is not None:
                eos.update([source] if isinstance(source, int) else list(source))
        stops = {i for i, t in enumerate(texts) if "\n" in t} | eos
        _STOP_CACHE[key] = (stops, eos)
    return _STOP_CACHE[key]


def _model_parts(model: Any) -> tuple[Any, Any]:
    """(base model returning hidden states, output head). Logits are computed
    only at the positions needed, so the head is applied here."""
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"segflex.generate: models with {attr}={value} are not supported")
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise TypeError("segflex.generate needs a causal LM with get_decoder() and get_output_embeddings()")
    return base, head


def _choose(
    scores: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Greedy (temperature 0) or top-p sampling of one token per row of scores."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _fuse(logits: torch.Tensor, group_of: torch.Tensor, n_groups: int, combine: str,
          weights: Optional[torch.Tensor]) -> torch.Tensor:
    """One score row per group from the logits of its rows."""
    if combine == "none":
        return logits
    vocab = logits.shape[-1]
    if combine == "avg":
        counts = torch.bincount(group_of, minlength=n_groups).to(logits.dtype)
        return logits.new_zeros(n_groups, vocab).index_add_(0, group_of, logits) / counts[:, None]
    if combine == "max":
        probs = torch.softmax(logits, dim=-1)
        index = group_of[:, None].expand_as(probs)
        return probs.new_zeros(n_groups, vocab).scatter_reduce_(0, index, probs, "amax", include_self=False)
    if combine == "weighted_avg":
        return logits.new_zeros(n_groups, vocab).index_add_(0, group_of, logits * weights[:, None])
    raise ValueError(f"combine must be none, avg, max or weighted_avg, got {combine!r}")


MIN_SHARED_PREFIX = 16
CUDA_GRAPHS: Optional[bool] = None  # default of generate_rows(cuda_graphs=None): None = auto


def _use_graphs(requested: Optional[bool], model: Any, device: torch.device) -> bool:
    """CUDA graphs for the decode steps: on by default when the model sits on one CUDA device."""
    requested = CUDA_GRAPHS if requested is None else requested
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    one_device = len(devices) <= 1
    if requested is None:
        return device.type == "cuda" and one_device
    if requested and (device.type != "cuda" or not one_device):
        raise ValueError("cuda_graphs=True needs a model on a single CUDA device")
    return bool(requested)


def _causal_up_to(layout: SegmentLayout, n: int) -> bool:
    """Whether the mask of the first ``n`` positions is plain causal (so their keys do not
    depend on what follows or on other rows): after the first isolated segment, only global
    segments may start before ``n``."""
    seen_isolated = False
    for start, kind in zip(layout.starts, layout.kinds):
        if start >= n:
            break
        if kind == "isolated":
            if seen_isolated:
                return False
            seen_isolated = True
        elif kind == "shared" and seen_isolated:
            return False
    return True


def _shared_prefix(rows: Sequence[Row]) -> int:
    """Length of the token prefix every row shares with the same positions and a causal mask
    (0 when too short to pay). The last token of each row is always left to the batch: its
    logits start the generation."""
    if len(rows) < 2:
        return 0
    first = rows[0].tokens
    n = min(len(r.tokens) for r in rows) - 1
    for r in rows[1:]:
        k = 0
        while k < n and r.tokens[k] == first[k]:
            k += 1
        n = k
    for r in rows:
        mismatch = np.nonzero(np.asarray(r.positions[:n]) != np.arange(n))[0]
        n = int(mismatch[0]) if mismatch.size else n
    while n > 0 and not all(_causal_up_to(r.layout, n) for r in rows):
        n -= 1
    return n if n >= MIN_SHARED_PREFIX else 0


@torch.no_grad()
def generate_rows(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    *,
    group_of: Optional[Sequence[int]] = None,
    combine: str = "none",
    weights: Optional[Sequence[float]] = None,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    stop: bool = True,
    cuda_graphs: Optional[bool] = None,
) -> list[Generation]:
    """Generate for a batch of rows: one masked prefill, then KV-cached decode.

    ``group_of[r]`` is the group of row r (default: each row its own group);
    a group's rows are fused by ``combine`` and all get the group's token.
    With ``num_samples > 1`` (groups of one row only) each row is sampled
    ``num_samples`` times from one prefill; the result lists the samples of
    row 0, then those of row 1, and so on. Returns one :class:`Generation` per
    group (or per sample). ``stop=False`` (or ``tokenizer=None``) generates
    exactly ``max_new_tokens`` tokens (benchmarks); without a tokenizer the
    texts are empty. ``cuda_graphs`` (default: on when the model sits on one CUDA
    device) replays each decode step from a captured CUDA graph
    (:mod:`segflex.graphs`); finished rows then stay in the batch.
    """
    if not rows:
        return []
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if combine != "none" and (temperature != 0 or num_samples != 1):
        raise ValueError("logit fusion (combine) decodes greedily: use temperature=0 and num_samples=1")
    base, head = _model_parts(model)
    device = head.weight.device
    group_of = list(range(len(rows))) if group_of is None else list(group_of)
    if len(group_of) != len(rows):
        raise ValueError(f"group_of has {len(group_of)} entries for {len(rows)} rows")
    n_groups = max(group_of) + 1
    if combine == "none" and sorted(group_of) != list(range(len(rows))):
        raise ValueError("without combine every row must be its own group")

    # ---- one masked prefill of the right-padded batch
    lengths = torch.tensor([len(r.tokens) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    pos = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r.tokens)] = torch.tensor(r.tokens)
        pos[i, : len(r.tokens)] = torch.from_numpy(np.asarray(r.positions, dtype=np.int64))
    next_pos = pos[torch.arange(len(rows)), lengths - 1] + 1
    layouts = [r.layout for r in rows]
    table = pack(layouts, device)  # packed once, read by every layer and step
    cache_len = int(lengths.max()) + max_new_tokens
    graphed = None
    if _use_graphs(cuda_graphs, model, device) and max_new_tokens > 1:
        graphed = decoder_for(model, base, head, len(rows) * num_samples, cache_len)
    cache = graphed.cache if graphed is not None and num_samples == 1 else \
        SegmentCache(model.config.num_hidden_layers, cache_len)
    shared = _shared_prefix(rows)
    cache_arg = cache_keyword(base)  # "cache" or "past_key_values", by transformers version
    with enable(model):
        if shared:  # encode the common prefix once, copy its keys into every row
            prefix = SegmentCache(model.config.num_hidden_layers, shared)
            prefix.begin_prefill(torch.tensor([shared]))
            base(input_ids=ids[:1, :shared].to(device), position_ids=pos[:1, :shared].to(device),
                 **{cache_arg: prefix}, use_cache=True,
                 segment_layouts=[SegmentLayout([shared], ["global"])])
            prefix.advance()
            cache.put_prefix(prefix, len(rows))
            del prefix
        cache.begin_prefill(lengths, offset=shared)
        hidden = base(input_ids=ids[:, shared:].to(device), position_ids=pos[:, shared:].to(device),
                      **{cache_arg: cache}, use_cache=True, segment_layouts=table).last_hidden_state
        cache.advance()
        last = (lengths - 1 - shared).to(device)
        logits = head(hidden[torch.arange(len(rows), device=device), last]).float()

        # ---- samples share the prefill: repeat rows, caches and layouts
        if num_samples > 1:
            if graphed is not None:
                graphed.cache.fill_from(cache, num_samples)
                cache = graphed.cache
            else:
                cache.repeat_rows(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
            next_pos = next_pos.repeat_interleave(num_samples)
            layouts = [lay for lay in layouts for _ in range(num_samples)]
            table = pack(layouts, device)
            group_of = list(range(len(layouts)))
            n_groups = len(layouts)
        group_t = torch.tensor(group_of, device=device)
        w = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        stops, eos = _stop_ids(tokenizer, model, logits.shape[-1]) if stop else (set(), set())
        next_pos = next_pos.to(device)
        if graphed is not None:
            graphed.load_table(table)
            graphed.start(cache.lens, next_pos)

        # ---- decode: each group stops on its own; without graphs, once half the rows are
        # finished the batch (cache, positions, layouts) shrinks to the rows still generating
        out: list[list[int]] = [[] for _ in range(n_groups)]
        done = [False] * n_groups
        row_group = group_t               # group of each row still in the batch
        live = list(range(n_groups))      # without fusion: the group of each score row
        for step in range(max_new_tokens):
            token = _choose(_fuse(logits, row_group, n_groups, combine, w), temperature, top_p, generator)
            owners = live if combine == "none" else range(n_groups)
            for g, t in zip(owners, token.tolist()):  # the one host sync of a step
                if not done[g]:
                    out[g].append(t)
                    done[g] = t in stops
            if all(done) or step == max_new_tokens - 1:
                break
            row_token = token if combine == "none" else token[row_group]
            if graphed is not None:  # finished rows stay: the graph has fixed shapes
                logits = graphed.step(row_token)
                continue
            keep = [i for i, g in enumerate(row_group.tolist()) if not done[g]]
            if len(keep) <= len(row_group) // 2:
                idx = torch.tensor(keep, device=device)
                cache.select_rows(idx)
                row_group, next_pos, row_token = row_group[idx], next_pos[idx], row_token[idx]
                w = None if w is None else w[idx]
                layouts = [layouts[i] for i in keep]
                table = pack(layouts, device)
                if combine == "none":
                    live = [live[i] for i in keep]
            cache_lens = cache.begin_decode(1).to(device)
            hidden = base(input_ids=row_token[:, None], position_ids=(next_pos + step)[:, None],
                          **{cache_arg: cache}, use_cache=True, segment_layouts=table,
                          cache_lens=cache_lens).last_hidden_state
            cache.advance()
            logits = head(hidden[:, -1]).float()

    results = []
    for tokens in out:
        if tokenizer is None:
            results.append(Generation(tokens, "", ""))
            continue
        text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        results.append(Generation(tokens, text, first_line(text)))
    return results


# ------------------------------------------------------------------ methods


def _generator(seed: Optional[int], model: Any) -> Optional[torch.Generator]:
    if seed is None:
        return None
    device = model.get_output_embeddings().weight.device
    return torch.Generator(device=device).manual_seed(int(seed))


def generate(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    format: str = "shared",
    positions: str = "aligned",
    paraphrase_bias: Union[float, str] = "-log_n",
    separator: Sequence[int] = (),
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: Optional[int] = 0,
    batch_size: int = 16,
) -> list[list[Generation]]:
    """Self-ensemble generation: one masked sequence per question.

    Returns, per question, ``num_samples`` generations (one when greedy).
    """
    rows = [self_ensemble_row(q, format, positions, paraphrase_bias, separator) for q in questions]
    gen = _generator(seed, model)
    return _by_question(_chunked(model, tokenizer, rows, batch_size, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, num_samples=num_samples,
                                 generator=gen), num_samples)


def _chunked(model, tokenizer, rows, batch_size, **kw) -> list[Generation]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = []
    for start in range(0, len(rows), batch_size):
        out += generate_rows(model, tokenizer, rows[start : start + batch_size], **kw)
    return out


def _by_question(flat: list, per: int) -> list[list]:
    return [flat[i : i + per] for i in range(0, len(flat), per)]


def default_normalize(text: str) -> list[str]:
    """Lower-cased whitespace tokens (a lemmatiser can be passed instead)."""
    return text.lower().split()


def partial_match(a: Sequence[str], b: Sequence[str]) -> bool:
    """Bidirectional partial match of two token sequences: equal, or one
    occurs as a contiguous run inside the other (an empty sequence matches
    only an empty one)."""
    from .evaluate import partial_match as lemma_match
    return list(a) == list(b) or lemma_match(a, [b], bidirectional=True)


def self_consistency(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    num_samples: int = 100,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: Optional[int] = 0,
    max_new_tokens: int = 16,
    normalize: Callable[[str], Sequence[str]] = default_normalize,
    batch_size: int = 16,
) -> list[list[ConfidenceRecord]]:
    """Confidence of every paraphrase prompt: the fraction of ``num_samples``
    sampled answers that match its greedy answer (bidirectional partial match
    of ``normalize``-d first lines). ``batch_size`` counts prompts per batch
    (each expands to ``num_samples`` rows after one prefill)."""
    rows = [_plain_row(q.prompt(i)) for q in questions for i in range(q.n)]
    greedy = _chunked(model, tokenizer, rows, batch_size, max_new_tokens=max_new_tokens)
    sampled = _chunked(model, tokenizer, rows, batch_size, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, num_samples=num_samples,
                       generator=_generator(seed, model))
    records = []
    for r, g in enumerate(greedy):
        samples = [s.prediction for s in sampled[r * num_samples : (r + 1) * num_samples]]
        ref = normalize(g.prediction)
        hits = sum(partial_match(ref, normalize(s)) for s in samples)
        records.append(ConfidenceRecord(g.prediction, samples, hits / num_samples))
    out, k = [], 0
    for q in questions:
        out.append(records[k : k + q.n])
        k += q.n
    return out


def _weights(confidences: Sequence[float], index: int) -> list[float]:
    total = float(sum(confidences))
    if total <= 0:
        warnings.warn(f"question {index}: all confidences are zero, using equal weights", stacklevel=3)
        return [1.0 / len(confidences)] * len(confidences)
    return [float(c) / total for c in confidences]


def run_method(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    method: str,
    *,
    confidences: Optional[Sequence[Sequence[float]]] = None,
    format: str = "shared",
    positions: str = "aligned",
    paraphrase_bias: Union[float, str] = "-log_n",
    separator: Sequence[int] = (),
    max_new_tokens: int = 16,
    batch_size: int = 16,
    confidence_samples: int = 100,
    confidence_kwargs: Optional[dict] = None,
) -> list[list[Generation]]:
    """Run one method greedily over a batch of questions.

    Returns one list per question: N generations for ``per_prompt`` (one per
    paraphrase), one for every other method. ``batch_size`` counts questions
    per engine call. ``weighted_avg`` and ``weighted_max`` use
    ``confidences`` (one list of N numbers per question), computed with
    :func:`self_consistency` (``confidence_samples`` samples) when not given.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("self_ensemble", "flex"):
        return generate(model, tokenizer, questions, format=format, positions=positions,
                        paraphrase_bias=paraphrase_bias, separator=separator,
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
    kw = dict(max_new_tokens=max_new_tokens)
    if method == "origin":
        rows = [_plain_row(q.prompt(0)) for q in questions]
        return _by_question(_chunked(model, tokenizer, rows, batch_size, **kw), 1)
    if method == "per_prompt":
        out = []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            rows = [_plain_row(q.prompt(i)) for q in chunk for i in range(q.n)]
            flat = generate_rows(model, tokenizer, rows, **kw)
            k = 0
            for q in chunk:
                out.append(flat[k : k + q.n])
                k += q.n
        return out

    if method in ("weighted_avg", "weighted_max"):
        if confidences is None:
            records = self_consistency(model, tokenizer, questions, num_samples=confidence_samples,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       **(confidence_kwargs or {}))
            confidences = [[r.confidence for r in rs] for rs in records]
        if len(confidences) != len(questions):
            raise ValueError(f"confidences has {len(confidences)} entries for {len(questions)} questions")
        for i, (c, q) in enumerate(zip(confidences, questions)):
            if len(c) != q.n:
                raise ValueError(f"confidences[{i}] has {len(c)} values for {q.n} paraphrases")
    if method == "weighted_max":
        # weights are static, so this is the most confident paraphrase alone
        best = [int(np.argmax(np.asarray(c, dtype=np.float64))) for c in confidences]
        rows = [_plain_row(q.prompt(b)) for q, b in zip(questions, best)]
        return _by_question(_chunked(model, tokenizer, rows, batch_size, **kw), 1)

    out = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        rows, group_of, weights = [], [], []
        for g, q in enumerate(chunk):
            rows += [_plain_row(q.prompt(i)) for i in range(q.n)]
            group_of += [g] * q.n
            if method == "weighted_avg":
                weights += _weights(confidences[start + g], start + g)
        out += generate_rows(model, tokenizer, rows, group_of=group_of, combine=method,
                             weights=weights if method == "weighted_avg" else None, **kw)
    return _by_question(out, 1)
