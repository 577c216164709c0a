"""Scoring predictions: spaCy lemmas and partial-match accuracy.

A prediction is correct when the lemma sequence of some answer alias occurs
as a contiguous run inside the prediction's lemma sequence (lower-cased
lemmas; whitespace and punctuation tokens dropped). The bidirectional variant
also accepts the prediction inside an alias; it is the one used to compare
sampled answers with a greedy answer (self-consistency confidence).

Lemmas come from a full English spaCy pipeline when one is installed
(``en_core_web_lg``, then ``md``, then ``sm``), otherwise from a blank English
pipeline with the lookup lemmatizer of ``spacy-lookups-data``, which needs no
download. The pipeline is loaded once per process.

Run files (Feather, see :mod:`segflex.output`) are compared with
:func:`compare`, which returns a table of methods and accuracies, and
:func:`plot_comparison`, which draws it.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "SPACY_MODELS",
    "get_nlp",
    "pipeline_name",
    "lemmatize",
    "lemmatize_one",
    "extract_prediction",
    "contains_run",
    "partial_match",
    "is_correct",
    "score",
    "self_consistency",
    "accuracy",
    "oracle",
    "oracle_curve",
    "pair_analysis",
    "pair_correlations",
    "compare",
    "accuracy_table",
    "plot_comparison",
]

SPACY_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm")


# --------------------------------------------------------------------------
# Lemmatisation
# --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def get_nlp(model: str | None = None) -> Any:
    """The spaCy pipeline used for lemmas, loaded once.

    Args:
        model: a spaCy package name to require; ``None`` tries
            ``en_core_web_lg/md/sm`` and falls back to ``spacy.blank("en")``
            with the lookup lemmatizer (``spacy-lookups-data``). The
            environment variable ``SEGFLEX_SPACY_MODEL`` sets the same.
    """
    import spacy

    model = model or os.environ.get("SEGFLEX_SPACY_MODEL") or None
    if model is not None and model != "blank":
        try:
            return spacy.load(model, disable=["parser", "ner"])
        except OSError as err:
            raise ValueError(f"model: spaCy pipeline {model!r} is not installed ({err})") from None
    if model is None:
        for name in SPACY_MODELS:
            try:
                return spacy.load(name, disable=["parser", "ner"])
            except OSError:
                continue
    nlp = spacy.blank("en")
    try:
        nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
        nlp.initialize()
    except Exception as err:  # spacy-lookups-data missing or broken
        raise RuntimeError(
            "no English spaCy pipeline is installed and the lookup lemmatizer could not be "
            f"initialised ({err}); install spacy-lookups-data or en_core_web_sm") from err
    return nlp


def pipeline_name(model: str | None = None) -> str:
    """Which pipeline :func:`get_nlp` gives, e.g. ``"en_core_web_lg"`` or ``"blank:en+lookup"``."""
    nlp = get_nlp(model)
    name = nlp.meta.get("name", "")
    if nlp.pipe_names == ["lemmatizer"] and name in ("", "pipeline"):
        return "blank:en+lookup"
    return f"{nlp.lang}_{name}"


@lru_cache(maxsize=None)
def _lookup_table(model: str | None) -> Any:
    """The lemma lookup table when the fallback pipeline is in use, else None."""
    nlp = get_nlp(model)
    if nlp.pipe_names != ["lemmatizer"]:
        return None
    pipe = nlp.get_pipe("lemmatizer")
    if getattr(pipe, "mode", None) != "lookup":
        return None
    return pipe.lookups.get_table("lemma_lookup")


def _doc_lemmas(doc: Any, table: Any) -> list[str]:
    # Punctuation and whitespace carry no answer content; dropping them lets
    # "Paris." match "Paris" and "Washington D.C." match "Washington, D.C.".
    out = []
    for t in doc:
        if t.is_space or t.is_punct:
            continue
        lemma = t.lemma_
        if table is not None and lemma == t.text and t.text != t.lower_:
            # The lookup table is case-sensitive and lists lower-case forms:
            # "Cats" at the start of a sentence should still become "cat".
            lemma = table.get(t.lower_, t.lower_)
        out.append(lemma.lower())
    return out


def lemmatize(texts: Sequence[str], batch_size: int = 256, model: str | None = None) -> list[list[str]]:
    """Lower-cased lemmas of each text (punctuation and whitespace dropped), batched."""
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got one string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
    nlp = get_nlp(model)
    table = _lookup_table(model)
    return [_doc_lemmas(doc, table) for doc in nlp.pipe(texts, batch_size=batch_size)]


def lemmatize_one(text: str) -> list[str]:
    """Lemmas of one text; usable as the ``normalize`` callable of the generator."""
    return lemmatize([text])[0]


def extract_prediction(generation: str, first_word: bool = False) -> str:
    """The prediction in a generation: its first line (stripped), or that line's first word."""
    if not isinstance(generation, str):
        raise TypeError(f"generation: expected str, got {type(generation).__name__}")
    line = generation.strip().split("\n")[0].strip()
    if first_word:
        words = line.split()
        return words[0] if words else ""
    return line


# --------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------


def contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether ``needle`` occurs as a contiguous run in ``haystack``; an empty needle never does."""
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    needle = list(needle)
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i:i + n]) == needle:
            return True
    return False


def partial_match(prediction: Sequence[str], aliases: Iterable[Sequence[str]],
                  bidirectional: bool = False) -> bool:
    """Partial match of lemma sequences.

    True when some alias's lemmas occur contiguously in the prediction's
    lemmas; with ``bidirectional``, also when the prediction's lemmas occur in
    an alias's. Empty sequences never match.
    """
    for alias in aliases:
        if contains_run(prediction, alias):
            return True
        if bidirectional and contains_run(alias, prediction):
            return True
    return False


def is_correct(prediction: str, answers: Sequence[str], bidirectional: bool = False) -> bool:
    """Whether one prediction matches one of the answer aliases (lemmatised)."""
    if isinstance(answers, str):
        raise TypeError("answers: expected a list of aliases, got one string")
    lem = lemmatize([prediction, *answers])
    return partial_match(lem[0], lem[1:], bidirectional=bidirectional)


def score(predictions: Sequence[str], answers: Sequence[Sequence[str]], bidirectional: bool = False,
          batch_size: int = 256) -> tuple[list[list[str]], list[bool]]:
    """Lemmas and correctness of many predictions, lemmatised in one batched pass.

    Returns:
        (prediction lemmas, correct flags), one entry per prediction.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"answers: {len(answers)} alias lists for {len(predictions)} predictions")
    flat: list[str] = list(predictions)
    spans = []
    for i, aliases in enumerate(answers):
        if isinstance(aliases, str):
            raise TypeError(f"answers[{i}]: expected a list of aliases, got one string")
        aliases = list(aliases)
        spans.append((len(flat), len(flat) + len(aliases)))
        flat.extend(aliases)
    lem = lemmatize(flat, batch_size=batch_size)
    pred_lem = lem[:len(predictions)]
    correct = [partial_match(pred_lem[i], lem[a:b], bidirectional=bidirectional)
               for i, (a, b) in enumerate(spans)]
    return pred_lem, correct


def self_consistency(greedy: str, samples: Sequence[str]) -> float:
    """Fraction of sampled answers that match the greedy answer (bidirectional, lemmatised).

    Returns 0.0 for no samples (never NaN).
    """
    if not samples:
        return 0.0
    lem = lemmatize([greedy, *samples])
    hits = sum(partial_match(s, [lem[0]], bidirectional=True) for s in lem[1:])
    return hits / len(samples)


# --------------------------------------------------------------------------
# Run files
# --------------------------------------------------------------------------


_NAME_RE = re.compile(r"^(?P<method>.+)-(?P<sel>[0-9][0-9,]*)$")


def _load(run: Any):
    """A run as a DataFrame: a path to a Feather file, or a DataFrame already."""
    import pandas as pd

    if isinstance(run, pd.DataFrame):
        return run, None
    path = Path(run)
    if not path.exists():
        raise ValueError(f"path: {path} does not exist")
    import pyarrow.feather as feather
    return feather.read_table(str(path)).to_pandas(), path


def _correct_column(df) -> list[bool]:
    """The ``correct`` column, scored here when the file does not carry it."""
    if "correct" in df.columns and not df["correct"].isna().any():
        return [bool(x) for x in df["correct"]]
    for col in ("prediction", "answers"):
        if col not in df.columns:
            raise ValueError(f"run: no column {col!r} to score")
    return score([str(p) for p in df["prediction"]], [list(a) for a in df["answers"]])[1]


def accuracy(run: Any) -> float:
    """Mean correctness of a run (a Feather path or a DataFrame); rows are weighted equally."""
    df, _ = _load(run)
    if len(df) == 0:
        raise ValueError("run: no rows")
    flags = _correct_column(df)
    return sum(flags) / len(flags)


def _indices_column(df) -> list[tuple[int, ...]]:
    if "paraphrase_indices" not in df.columns:
        raise ValueError("run: no column 'paraphrase_indices' (needed for the oracle)")
    return [tuple(int(i) for i in x) for x in df["paraphrase_indices"]]


def oracle(run: Any, num_paraphrases: int | None = None,
           indexs: Sequence[int] | None = None) -> dict[str, float]:
    """Oracle accuracies over single-paraphrase results of each question.

    ``run`` holds one row per (question, paraphrase), e.g. a ``per_prompt``
    run, or several single-paraphrase runs concatenated. The paraphrases
    considered are ``indexs`` or the first ``num_paraphrases`` (default: all).

    Returns:
        ``{"or": any paraphrase right, "and": all right, "mean": mean
        single-paraphrase accuracy, "questions": count}``.
    """
    df, _ = _load(run)
    idx = _indices_column(df)
    flags = _correct_column(df)
    wanted = None
    if indexs is not None:
        wanted = set(int(i) for i in indexs)
    elif num_paraphrases is not None:
        if num_paraphrases < 1:
            raise ValueError(f"num_paraphrases: must be >= 1, got {num_paraphrases}")
        wanted = set(range(num_paraphrases))
    per_question: dict[str, dict[int, bool]] = {}
    for uid, ix, ok in zip(df["uuid"], idx, flags):
        if len(ix) != 1:
            raise ValueError("run: oracle needs single-paraphrase rows (paraphrase_indices of length 1)")
        if wanted is None or ix[0] in wanted:
            per_question.setdefault(str(uid), {})[ix[0]] = ok
    if not per_question:
        raise ValueError("run: no rows with the requested paraphrases")
    if wanted is not None:
        for uid, got in per_question.items():
            missing = wanted - set(got)
            if missing:
                raise ValueError(f"run: question {uid} lacks paraphrases {sorted(missing)}")
    n = len(per_question)
    all_flags = [v for got in per_question.values() for v in got.values()]
    return {
        "or": sum(any(got.values()) for got in per_question.values()) / n,
        "and": sum(all(got.values()) for got in per_question.values()) / n,
        "mean": sum(all_flags) / len(all_flags),
        "questions": n,
    }


def oracle_curve(run: Any, counts: Iterable[int] = range(1, 11)):
    """Oracle OR/AND and mean accuracy for the first k paraphrases, for each k available.

    Returns a DataFrame with columns ``num_paraphrases, or, and, mean, questions``.
    """
    import pandas as pd

    df, _ = _load(run)
    have = max((max(ix) for ix in _indices_column(df)), default=-1) + 1
    rows = []
    for k in counts:
        if k > have:
            break
        rows.append({"num_paraphrases": k, **oracle(df, num_paraphrases=k)})
    return pd.DataFrame(rows, columns=["num_paraphrases", "or", "and", "mean", "questions"])


def _prediction_lemmas(df) -> list[list[str]]:
    """Lemmas of each row's prediction: the ``lemmas`` column when complete, else computed."""
    if "lemmas" in df.columns and not df["lemmas"].isna().any():
        return [[str(x) for x in lem] for lem in df["lemmas"]]
    if "prediction" not in df.columns:
        raise ValueError("run: no column 'prediction' (needed for pair consistency)")
    return lemmatize([str(p) for p in df["prediction"]])


def pair_analysis(single_run: Any, pair_runs: Sequence[Any] = ()):
    """How the agreement of two paraphrases relates to what ensembling them gains.

    ``single_run`` holds one row per (question, paraphrase), e.g. a ``per_prompt`` run. For
    every pair of paraphrase indices (i, j) it gives, over the questions that have both:

    * ``acc_i``, ``acc_j``: the single-paraphrase accuracies;
    * ``consistency``: the fraction of questions whose two predictions match (bidirectional
      lemma partial match, the rule self-consistency uses);
    * ``diversity``: the fraction of questions where exactly one of the two is right.

    Each run of ``pair_runs`` (e.g. ``diversity/avg-0,3.feather``, written with
    ``--indexs 0,3``) has every row on one pair; it adds ``acc_{method}`` (the ensemble's
    accuracy on that pair) and ``gain_{method}`` (that minus the better of ``acc_i`` and
    ``acc_j``). Returns a DataFrame sorted by (i, j).
    """
    import itertools
    import math

    import pandas as pd

    df, _ = _load(single_run)
    idx = _indices_column(df)
    if any(len(ix) != 1 for ix in idx):
        raise ValueError("single_run: needs single-paraphrase rows (paraphrase_indices of length 1)")
    flags = _correct_column(df)
    lemmas = _prediction_lemmas(df)
    by_q: dict[str, dict[int, tuple[bool, list[str]]]] = {}
    for uid, ix, ok, lem in zip(df["uuid"], idx, flags, lemmas):
        by_q.setdefault(str(uid), {})[ix[0]] = (ok, lem)
    indices = sorted({ix[0] for ix in idx})
    if len(indices) < 2:
        raise ValueError("single_run: needs at least two paraphrase indices")

    rows = {}
    for i, j in itertools.combinations(indices, 2):
        both = [got for got in by_q.values() if i in got and j in got]
        if not both:
            continue
        n = len(both)
        rows[(i, j)] = {
            "i": i, "j": j, "questions": n,
            "acc_i": sum(g[i][0] for g in both) / n,
            "acc_j": sum(g[j][0] for g in both) / n,
            "consistency": sum(partial_match(g[i][1], [g[j][1]], bidirectional=True)
                               for g in both) / n,
            "diversity": sum(g[i][0] != g[j][0] for g in both) / n,
        }
    for run in pair_runs:
        pdf, path = _load(run)
        pairs = {tuple(int(x) for x in ix) for ix in _indices_column(pdf)}
        if len(pairs) != 1 or len(next(iter(pairs))) != 2:
            name = path.name if path is not None else "a pair run"
            raise ValueError(f"pair_runs: {name} must have every row on one pair of paraphrases")
        key = tuple(sorted(next(iter(pairs))))
        if key not in rows:
            raise ValueError(f"pair_runs: pair {key} has no questions in single_run")
        method = str(_first(pdf, "method", "") or (path.stem.split("-")[0] if path else "ensemble"))
        pflags = _correct_column(pdf)
        acc = sum(pflags) / len(pflags) if pflags else math.nan
        rows[key][f"acc_{method}"] = acc
        rows[key][f"gain_{method}"] = acc - max(rows[key]["acc_i"], rows[key]["acc_j"])
    return pd.DataFrame([rows[k] for k in sorted(rows)])


def pair_correlations(table):
    """Pearson correlation of every ``gain_*`` column of :func:`pair_analysis`'s table with
    consistency and with diversity (NaN where a column is constant or has < 3 pairs)."""
    import pandas as pd

    out = []
    for col in [c for c in table.columns if c.startswith("gain_")]:
        sub = table[["consistency", "diversity", col]].dropna()
        def r(x):
            if len(sub) < 3 or sub[x].std() == 0 or sub[col].std() == 0:
                return float("nan")
            return float(sub[x].corr(sub[col]))
        out.append({"method": col[len("gain_"):], "pairs": len(sub),
                    "r_consistency": r("consistency"), "r_diversity": r("diversity")})
    return pd.DataFrame(out, columns=["method", "pairs", "r_consistency", "r_diversity"])


def _first(df, col: str, default: Any = None) -> Any:
    if col in df.columns and len(df):
        v = df[col].iloc[0]
        return v if v is not None else default
    return default


def compare(feather_paths: Sequence[str | os.PathLike]):
    """One row per run file: method, selection, accuracy, and oracle values for single-paraphrase runs.

    Method and number of paraphrases come from the columns when present,
    otherwise from the file name ``{method}-{N}.feather`` /
    ``{method}-{i,j,...}.feather``.

    Returns:
        DataFrame with columns ``file, method, num_paraphrases, indices,
        model, dataset, position_mode, bias, questions, accuracy, oracle_or,
        oracle_and`` (oracles only for ``per_prompt``-style runs, else NaN).
    """
    import math

    import pandas as pd

    if isinstance(feather_paths, (str, os.PathLike)):
        feather_paths = [feather_paths]
    rows = []
    for p in feather_paths:
        df, path = _load(p)
        m = _NAME_RE.match(path.stem) if path is not None else None
        method = _first(df, "method") or (m.group("method") if m else path.stem)
        sel = m.group("sel") if m else ""
        indices = ""
        if "paraphrase_indices" in df.columns and len(df):
            all_idx = sorted({int(i) for ix in df["paraphrase_indices"] for i in ix})
            indices = ",".join(str(i) for i in all_idx)
            n_para = len(all_idx)
        elif sel:
            n_para = len(sel.split(",")) if "," in sel else int(sel)
            indices = sel if "," in sel else ""
        else:
            n_para = math.nan
        flags = _correct_column(df) if len(df) else []
        single = ("paraphrase_indices" in df.columns and len(df)
                  and all(len(ix) == 1 for ix in df["paraphrase_indices"]))
        orc = oracle(df) if single and df["uuid"].duplicated().any() else None
        bias = _first(df, "bias", math.nan)
        rows.append({
            "file": str(path) if path is not None else "",
            "method": str(method),
            "num_paraphrases": n_para,
            "indices": indices,
            "model": _first(df, "model", ""),
            "dataset": _first(df, "dataset", ""),
            "position_mode": _first(df, "position_mode", ""),
            "bias": float(bias) if bias is not None else math.nan,
            "questions": int(df["uuid"].nunique()) if "uuid" in df.columns else len(df),
            "accuracy": sum(flags) / len(flags) if flags else math.nan,
            "oracle_or": orc["or"] if orc else math.nan,
            "oracle_and": orc["and"] if orc else math.nan,
        })
    return pd.DataFrame(rows)


def accuracy_table(table):
    """``compare``'s accuracies pivoted: one row per method, one column per number of paraphrases."""
    if len(table) == 0:
        raise ValueError("table: no runs")
    return table.pivot_table(index="method", columns="num_paraphrases", values="accuracy",
                             aggfunc="mean")


def plot_comparison(table, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Bar chart of ``compare``'s accuracies (one bar per run), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(table) == 0:
        raise ValueError("table: no runs to plot")
    labels = []
    for _, r in table.iterrows():
        n = r.get("num_paraphrases")
        n = int(n) if isinstance(n, (int, float)) and n == n else None
        indices = str(r.get("indices") or "")
        # An explicit selection is shown as indices, "the first N" as N.
        first_n = n is not None and indices in ("", ",".join(str(i) for i in range(n)))
        sel = f"N={n}" if first_n else f"[{indices}]"
        labels.append(f"{r['method']}\n{sel}")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.8))
    bars = ax.bar(range(len(labels)), table["accuracy"], color="#4C72B0")
    for b, v in zip(bars, table["accuracy"]):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("accuracy")
    top = float(table["accuracy"].max())
    ax.set_ylim(0, min(1.0, max(0.1, top * 1.2)) if top == top else 1.0)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
