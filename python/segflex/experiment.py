"""The experiment: a method over a data set, into a Feather file, resumable.

    from segflex import experiment
    path = experiment.run("self_ensemble", dataset="webqa", num_paraphrases=5)
    experiment.run_all(out="results")          # every method and ablation on the sample

Method names are those of :mod:`segflex.generate` (``origin``, ``per_prompt``, ``avg``,
``max``, ``weighted_avg``, ``weighted_max``, ``self_ensemble``/``flex``). A self-ensemble run
with other than the default options is labelled with them, e.g.
``self_ensemble+seed+contiguous+bias0`` (the earlier system's method), so ablations get files
of their own.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DEFAULT_METHODS = ("origin", "per_prompt", "avg", "max", "weighted_avg", "weighted_max",
                   "self_ensemble")

# Self-ensemble ablations run by run_all: (format, positions, bias).
ABLATIONS = (
    ("shared", "aligned", "-log_n"),      # the default: DESIGN's layout + aligned + 1/N
    ("shared", "aligned", 0.0),
    ("shared", "contiguous", "-log_n"),
    ("shared", "contiguous", 0.0),        # mask alone
    ("seed", "contiguous", 0.0),          # the earlier system's format 2
)


@dataclass(frozen=True)
class Options:
    """Everything that shapes one run besides the method."""

    dataset: str = "webqa"
    data: str | None = None
    num_paraphrases: int | None = 5
    indexs: tuple[int, ...] | None = None
    batch_size: int = 8
    max_samples: int | None = None
    max_new_tokens: int = 10
    format: str = "shared"
    positions: str = "aligned"
    bias: float | str = "-log_n"
    confidence_samples: int = 100
    checkpoint_every: int = 50
    resume: bool = False
    bidirectional: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel run (``torchrun`` sets RANK and WORLD_SIZE):
    every ``world``-th question from ``rank`` on. Each rank writes its own file; rank 0 merges
    them, in question order, into the run's file."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Shard":
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
        return cls(rank, world)

    def path(self, path: Path) -> Path:
        return path if self.world == 1 else path.with_name(
            f"{path.stem}.rank{self.rank}-of-{self.world}{path.suffix}")

    def take(self, items: Sequence) -> list:
        return list(items[self.rank::self.world])

    def barrier(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")  # CPU rendezvous: only file hand-over crosses it
        dist.barrier()

    def merge(self, path: Path, questions: Sequence) -> None:
        """Rank 0: the shard files of ``path`` into ``path``, rows in question order."""
        if self.world == 1 or self.rank != 0:
            return
        import pyarrow as pa
        import pyarrow.feather as feather

        from .output import write_table
        shards = [Shard(r, self.world).path(path) for r in range(self.world)]
        table = pa.concat_tables([feather.read_table(str(p)) for p in shards])
        order = {q.uuid: i for i, q in enumerate(questions)}
        keys = [order[u] for u in table.column("uuid").to_pylist()]
        ranked = sorted(range(len(keys)), key=lambda i: keys[i])  # stable: rows of a question stay
        write_table(path, table.take(pa.array(ranked)))
        for p in shards:
            p.unlink()


def label(method: str, opts: Options) -> str:
    """The run's name: the method, plus the self-ensemble options that differ from the default."""
    if method not in ("self_ensemble", "flex"):
        return method
    extra = []
    if opts.format != "shared":
        extra.append(opts.format)
    if opts.positions != "aligned":
        extra.append(opts.positions)
    if opts.bias != "-log_n":
        extra.append(f"bias{float(opts.bias):g}")
    return "+".join([method] + extra)


def _bias_value(bias: float | str, n: int) -> float:
    return -math.log(n) if bias == "-log_n" else float(bias)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


def load_questions(opts: Options):
    """The data set and the test questions of this run (checked for enough paraphrases)."""
    from .data import load_dataset
    ds = load_dataset(opts.dataset, opts.data)
    ds.check_paraphrases(opts.num_paraphrases, list(opts.indexs) if opts.indexs else None)
    questions = ds.test[: opts.max_samples] if opts.max_samples else ds.test
    return ds, questions


def _encode(ds, tokenizer, questions, opts: Options):
    from .generate import encode_question
    parts = [ds.prompt_parts(q, opts.num_paraphrases if not opts.indexs else None,
                             list(opts.indexs) if opts.indexs else None) for q in questions]
    encoded = [encode_question(tokenizer, p.prefix, p.paraphrases, p.answer_cue) for p in parts]
    return parts, encoded


def confidences(model, tokenizer, ds, questions, opts: Options, out: Path,
                shard: Shard = Shard()) -> dict[str, list[float]]:
    """Self-consistency confidence of every selected paraphrase, cached in
    ``{out}/confidence-{selection}.feather`` (uuid, paraphrase, prompt, answers,
    greedy_predict, sample_predicts, lemmas, confidence)."""
    import pyarrow as pa
    import pyarrow.feather as feather

    from .evaluate import lemmatize_one
    from .generate import self_consistency
    from .output import write_table

    sel = ",".join(map(str, opts.indexs)) if opts.indexs else str(opts.num_paraphrases)
    path = shard.path(out / f"confidence-{sel}-k{opts.confidence_samples}.feather")
    known: dict[str, list[float]] = {}
    rows: list[dict] = []
    if path.exists():
        rows = feather.read_table(str(path)).to_pylist()
        for r in rows:
            known.setdefault(r["uuid"], []).append(r["confidence"])
    todo = [q for q in questions if q.uuid not in known]
    bar = _progress(len(todo), "confidence", opts.progress and bool(todo))
    for start in range(0, len(todo), opts.batch_size):
        chunk = todo[start: start + opts.batch_size]
        parts, encoded = _encode(ds, tokenizer, chunk, opts)
        records = self_consistency(model, tokenizer, encoded, num_samples=opts.confidence_samples,
                                   max_new_tokens=opts.max_new_tokens, normalize=lemmatize_one,
                                   batch_size=opts.batch_size)
        for q, p, recs in zip(chunk, parts, records):
            for i, rec in enumerate(recs):
                rows.append({"uuid": q.uuid, "paraphrase": p.paraphrases[i], "prompt": p.prompt(i),
                             "answers": list(q.answers), "greedy_predict": rec.greedy,
                             "sample_predicts": rec.samples, "lemmas": lemmatize_one(rec.greedy),
                             "confidence": rec.confidence})
            known[q.uuid] = [rec.confidence for rec in recs]
        write_table(path, pa.Table.from_pylist(rows))
        bar.update(len(chunk))
    bar.close()
    return known


def run(method: str, model: Any, tokenizer: Any, opts: Options = Options(), *,
        out: str | Path = "results", model_name: str = "") -> Path:
    """Runs ``method`` over the test questions and writes its Feather file; returns the path.

    With ``opts.resume`` the questions already in the file are skipped, so a killed run
    continues where it stopped and ends with the same file as an uninterrupted one.
    """
    from .generate import METHODS, run_method
    from .output import RunWriter, run_path

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds, questions = load_questions(opts)
    name = label(method, opts)
    path = run_path(out, name, opts.num_paraphrases if not opts.indexs else None,
                    list(opts.indexs) if opts.indexs else None)
    shard = Shard.from_env()
    all_questions, questions = questions, shard.take(questions)
    conf = None
    if method in ("weighted_avg", "weighted_max"):
        conf = confidences(model, tokenizer, ds, questions, opts, out, shard)
    fused = method in ("self_ensemble", "flex")
    n_sel = len(opts.indexs) if opts.indexs else opts.num_paraphrases
    writer = RunWriter(shard.path(path), method=name, model=model_name, dataset=ds.name,
                       position_mode=opts.positions if fused else None,
                       bias=_bias_value(opts.bias, n_sel or 1) if fused else None,
                       checkpoint_every=opts.checkpoint_every, resume=opts.resume,
                       bidirectional=opts.bidirectional)
    todo = [q for q in questions if not writer.is_done(q.uuid)]
    bar = _progress(len(todo), name, opts.progress)
    with writer:
        for start in range(0, len(todo), opts.batch_size):
            chunk = todo[start: start + opts.batch_size]
            parts, encoded = _encode(ds, tokenizer, chunk, opts)
            t0 = time.perf_counter()
            results = run_method(model, tokenizer, encoded, method, format=opts.format,
                                 positions=opts.positions, paraphrase_bias=opts.bias,
                                 max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                                 confidences=[conf[q.uuid] for q in chunk] if conf else None)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for q, p, gens in zip(chunk, parts, results):
                rows = []
                for i, g in enumerate(gens):
                    indices = [p.indices[i]] if method == "per_prompt" else list(p.indices)
                    rows.append({"uuid": q.uuid, "paraphrases": list(p.paraphrases),
                                 "answers": list(q.answers), "prediction": g.prediction,
                                 "generation": g.generation, "paraphrase_indices": indices,
                                 "seconds": seconds})
                writer.add(rows)
            bar.update(len(chunk))
    bar.close()
    shard.barrier()
    shard.merge(path, all_questions)
    shard.barrier()
    return path


def run_all(model: Any, tokenizer: Any, opts: Options = Options(), *, out: str | Path = "results",
            methods: Sequence[str] = DEFAULT_METHODS, ablations: bool = True,
            model_name: str = "") -> list[Path]:
    """Every method (and, for the self-ensemble, every ablation) with the same options."""
    from dataclasses import replace
    paths = []
    for method in methods:
        if method in ("self_ensemble", "flex") and ablations:
            for fmt, positions, bias in ABLATIONS:
                variant = replace(opts, format=fmt, positions=positions, bias=bias)
                paths.append(run(method, model, tokenizer, variant, out=out, model_name=model_name))
        else:
            paths.append(run(method, model, tokenizer, opts, out=out, model_name=model_name))
    return paths


def paraphrase(model: Any, tokenizer: Any, questions: Sequence[str], *, rounds: int = 5,
               temperature: float = 1.5, top_p: float = 0.9, max_new_tokens: int = 30,
               batch_size: int = 16, progress: bool = True) -> dict[str, list[str]]:
    """WebQA paraphrases written by the model under test: ``rounds`` sampled rounds (round i
    seeded with i) of the few-shot paraphrasing prompt, the first line of each kept.

    Returns ``{question: [paraphrase 1, ..., paraphrase rounds]}``.
    """
    import torch

    from .data import paraphrase_prompt
    from .generate import _leading_special_ids, _plain_row, generate_rows

    bos = _leading_special_ids(tokenizer)
    rows = [_plain_row(list(bos) + tokenizer(paraphrase_prompt(q), add_special_tokens=False)["input_ids"])
            for q in questions]
    out: dict[str, list[str]] = {q: [] for q in questions}
    device = model.get_output_embeddings().weight.device
    bar = _progress(rounds * len(rows), "paraphrase", progress)
    for i in range(1, rounds + 1):
        gen = torch.Generator(device=device).manual_seed(i)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            results = generate_rows(model, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, generator=gen)
            for q, g in zip(questions[start: start + batch_size], results):
                if not g.prediction:
                    warnings.warn(f"round {i}: empty paraphrase of {q!r}; keeping the question")
                out[q].append(g.prediction or q)
            bar.update(len(chunk))
    bar.close()
    return out
