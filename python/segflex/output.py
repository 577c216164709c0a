"""Run files: one Feather file per (method, paraphrase selection).

File names follow the original experiment: ``{method}-{N}.feather`` for the
first N paraphrases, ``diversity/{method}-{i,j,...}.feather`` for an explicit
index selection. Each row is one question (or, for ``per_prompt``, one
question and one paraphrase) with the columns

    uuid, paraphrases, answers, prediction, generation,          (as the original)
    method, model, dataset, paraphrase_indices, position_mode, bias,
    lemmas, correct, seconds

Files are always written whole to a temporary file and moved into place with
``os.replace``, so a reader (or a run killed mid-write) never sees a partial
file. :class:`RunWriter` checkpoints every few questions and can resume a
killed run: questions already in the file are skipped, and the finished file
equals the one an uninterrupted run would have written.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "COLUMNS",
    "run_path",
    "write_table",
    "read_run",
    "RunWriter",
]

# Column order and Arrow types of a run file.
COLUMNS: tuple[str, ...] = (
    "uuid", "paraphrases", "answers", "prediction", "generation",
    "method", "model", "dataset", "paraphrase_indices", "position_mode", "bias",
    "lemmas", "correct", "seconds",
)


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("uuid", pa.string()),
        ("paraphrases", pa.list_(pa.string())),
        ("answers", pa.list_(pa.string())),
        ("prediction", pa.string()),
        ("generation", pa.string()),
        ("method", pa.string()),
        ("model", pa.string()),
        ("dataset", pa.string()),
        ("paraphrase_indices", pa.list_(pa.int32())),
        ("position_mode", pa.string()),
        ("bias", pa.float64()),
        ("lemmas", pa.list_(pa.string())),
        ("correct", pa.bool_()),
        ("seconds", pa.float64()),
    ])


def _format_indexs(indexs: Sequence[int] | str) -> str:
    if isinstance(indexs, str):
        parts = [p.strip() for p in indexs.split(",") if p.strip()]
    else:
        parts = [str(int(i)) for i in indexs]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"indexs: expected non-negative integers, got {indexs!r}")
    return ",".join(str(int(p)) for p in parts)


def run_path(out_dir: str | os.PathLike, method: str, num_paraphrases: int | None = None,
             indexs: Sequence[int] | str | None = None) -> Path:
    """Path of a run file: ``{out_dir}/{method}-{N}.feather`` or
    ``{out_dir}/diversity/{method}-{i,j,...}.feather`` when ``indexs`` is given."""
    if not isinstance(method, str) or not method or "/" in method or os.sep in method:
        raise ValueError(f"method: must be a plain non-empty name, got {method!r}")
    out = Path(out_dir)
    if indexs is not None:
        return out / "diversity" / f"{method}-{_format_indexs(indexs)}.feather"
    if isinstance(num_paraphrases, bool) or not isinstance(num_paraphrases, int) or num_paraphrases < 1:
        raise ValueError(f"num_paraphrases: must be a positive int, got {num_paraphrases!r}")
    return out / f"{method}-{num_paraphrases}.feather"


def _usual_permissions(path: str) -> None:
    """mkstemp makes files only their owner can read; a result file gets the permissions any
    new file would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_table(path: str | os.PathLike, table: Any) -> Path:
    """Write a pyarrow Table or pandas DataFrame as Feather, atomically.

    The data go to a temporary file in the same folder, are flushed to disk,
    and replace ``path`` in one ``os.replace``.
    """
    import pyarrow as pa
    import pyarrow.feather as feather

    if not isinstance(table, pa.Table):
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas is a dependency
            pd = None
        if pd is not None and isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        else:
            raise TypeError(f"table: expected a pyarrow Table or pandas DataFrame, "
                            f"got {type(table).__name__}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    _usual_permissions(tmp)
    try:
        feather.write_feather(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def read_run(path: str | os.PathLike):
    """A run file as a pandas DataFrame (list columns become numpy arrays of objects)."""
    import pyarrow.feather as feather

    p = Path(path)
    if not p.exists():
        raise ValueError(f"path: {p} does not exist")
    return feather.read_table(str(p)).to_pandas()


class RunWriter:
    """Collects the rows of one run and writes them to a Feather file.

    Usage::

        with RunWriter(run_path("out", "avg", 5), method="avg", model=m,
                       dataset="webqa", resume=True) as w:
            for batch in data.batches(8):
                todo = [q for q in batch if not w.is_done(q.uuid)]
                ...
                w.add([{"uuid": q.uuid, "paraphrases": [...], "answers": [...],
                        "prediction": ..., "generation": ..., "paraphrase_indices": [...],
                        "seconds": ...}, ...])

    Rows given in one :meth:`add` call stay together (all rows of a question,
    e.g. the N rows of ``per_prompt``, must come in one call). ``lemmas`` and
    ``correct`` are computed at each checkpoint (batched) unless a row brings
    them. Run-level values (method, model, dataset, position mode, bias) come
    from the constructor unless a row sets them.

    Args:
        path: the Feather file.
        method, model, dataset: written into every row.
        position_mode, bias: written into every row (``None`` -> null).
        checkpoint_every: rewrite the file after this many new questions.
        resume: keep the questions already in ``path`` and skip them; the
            file's method/model/dataset must match. Without it an existing
            file is replaced.
        bidirectional: scoring mode for ``correct``.
        extra_columns: names of additional per-row columns to keep (types
            inferred by Arrow), e.g. ``("prompts", "confidences")``.
    """

    def __init__(self, path: str | os.PathLike, *, method: str, model: str = "", dataset: str = "",
                 position_mode: str | None = None, bias: float | None = None,
                 checkpoint_every: int = 50, resume: bool = False, bidirectional: bool = False,
                 extra_columns: Sequence[str] = ()):
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
                or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: must be a positive int, got {checkpoint_every!r}")
        if not isinstance(method, str) or not method:
            raise ValueError(f"method: must be a non-empty string, got {method!r}")
        self.path = Path(path)
        self.meta = {"method": method, "model": str(model), "dataset": str(dataset),
                     "position_mode": position_mode,
                     "bias": None if bias is None else float(bias)}
        self.checkpoint_every = checkpoint_every
        self.bidirectional = bidirectional
        self.extra_columns = tuple(extra_columns)
        clash = set(self.extra_columns) & set(COLUMNS)
        if clash:
            raise ValueError(f"extra_columns: {sorted(clash)} are standard columns")
        self._rows: list[dict] = []        # written or scored rows, in order
        self._pending: list[dict] = []     # rows added since the last checkpoint (unscored)
        self._done: set[str] = set()
        self._pending_questions = 0
        if resume and self.path.exists():
            self._load_existing()

    # -- resume ------------------------------------------------------------------

    def _load_existing(self) -> None:
        import pyarrow.feather as feather

        table = feather.read_table(str(self.path))
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"path: {self.path} is not a run file (no columns {missing})")
        rows = table.to_pylist()
        for key in ("method", "model", "dataset"):
            found = {r[key] for r in rows}
            if found and found != {self.meta[key]}:
                raise ValueError(f"{key}: cannot resume {self.path}: it holds {key} "
                                 f"{sorted(found)}, this run is {self.meta[key]!r}")
        # Extra columns of the existing file are kept even if not declared again.
        self.extra_columns += tuple(c for c in table.column_names
                                    if c not in COLUMNS and c not in self.extra_columns)
        self._rows = rows
        self._done = {r["uuid"] for r in rows}

    # -- adding rows -----------------------------------------------------------

    @property
    def done(self) -> frozenset[str]:
        """Question ids already recorded (written or pending)."""
        return frozenset(self._done)

    def is_done(self, uuid: str) -> bool:
        """Whether question ``uuid`` is already recorded (skip it when resuming)."""
        return uuid in self._done

    def __len__(self) -> int:
        return len(self._rows) + len(self._pending)

    def add(self, rows: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> None:
        """Record the rows of one or more questions; checkpoint when enough have gathered."""
        if isinstance(rows, Mapping):
            rows = [rows]
        new = [self._normalise(r, i) for i, r in enumerate(rows)]
        uuids = []
        for r in new:
            if r["uuid"] in self._done:
                raise ValueError(f"uuid: question {r['uuid']} is already recorded in {self.path}")
            if r["uuid"] not in uuids:
                uuids.append(r["uuid"])
        self._pending.extend(new)
        self._done.update(uuids)
        self._pending_questions += len(uuids)
        if self._pending_questions >= self.checkpoint_every:
            self.flush()

    def _normalise(self, row: Mapping[str, Any], i: int) -> dict:
        for key in ("uuid", "answers", "prediction"):
            if key not in row:
                raise ValueError(f"rows[{i}]: missing field {key!r}")
        unknown = set(row) - set(COLUMNS) - set(self.extra_columns)
        if unknown:
            raise ValueError(f"rows[{i}]: unknown fields {sorted(unknown)} "
                             f"(declare them in extra_columns)")
        answers = row["answers"]
        if isinstance(answers, str):
            raise TypeError(f"rows[{i}]: 'answers' must be a list of aliases, not one string")
        out: dict[str, Any] = {
            "uuid": str(row["uuid"]),
            "paraphrases": [str(p) for p in row.get("paraphrases", ())],
            "answers": [str(a) for a in answers],
            "prediction": str(row["prediction"]),
            "generation": str(row.get("generation", row["prediction"])),
            "paraphrase_indices": [int(x) for x in row.get("paraphrase_indices", ())],
            "seconds": None if row.get("seconds") is None else float(row["seconds"]),
            "lemmas": None if row.get("lemmas") is None else [str(x) for x in row["lemmas"]],
            "correct": None if row.get("correct") is None else bool(row["correct"]),
        }
        for key, value in self.meta.items():
            out[key] = row.get(key, value)
        if out["bias"] is not None:
            out["bias"] = float(out["bias"])
            if math.isnan(out["bias"]):
                out["bias"] = None
        for key in self.extra_columns:
            out[key] = row.get(key)
        return out

    # -- writing ---------------------------------------------------------------

    def _score_pending(self) -> None:
        todo = [r for r in self._pending if r["lemmas"] is None or r["correct"] is None]
        if not todo:
            return
        from .evaluate import score

        lemmas, correct = score([r["prediction"] for r in todo], [r["answers"] for r in todo],
                                bidirectional=self.bidirectional)
        for r, lem, ok in zip(todo, lemmas, correct):
            if r["lemmas"] is None:
                r["lemmas"] = lem
            if r["correct"] is None:
                r["correct"] = ok

    def table(self):
        """All rows so far (pending ones scored) as a pyarrow Table."""
        import pyarrow as pa

        self._score_pending()
        rows = self._rows + self._pending
        schema = _schema()
        columns = {name: pa.array([r.get(name) for r in rows], type=schema.field(name).type)
                   for name in COLUMNS}
        fields = list(schema)
        for name in self.extra_columns:
            arr = pa.array([r.get(name) for r in rows])
            columns[name] = arr
            fields.append(pa.field(name, arr.type))
        return pa.Table.from_arrays([columns[f.name] for f in fields], schema=pa.schema(fields))

    def flush(self) -> Path:
        """Checkpoint: rewrite the whole file atomically with every row so far."""
        table = self.table()
        write_table(self.path, table)
        self._rows.extend(self._pending)
        self._pending = []
        self._pending_questions = 0
        return self.path

    def close(self) -> Path:
        """Write the final file."""
        return self.flush()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Keep what was done even when the run fails, so it can be resumed.
        self.flush()
