"""Run files: names, columns, atomic writes, checkpoints and resuming after a kill."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pytest

from segflex import output
from segflex.output import RunWriter, run_path

PYTHON_DIR = str(Path(output.__file__).resolve().parent.parent)

# 10 questions; question k is answered correctly when k is even.
ANSWERS = ["Paris", "Tokyo", "Rome", "Madrid", "Moscow", "Cairo", "Ottawa", "Canberra", "Lima", "Oslo"]


def record(k: int) -> dict:
    pred = ANSWERS[k] if k % 2 == 0 else "Berlin"
    return {"uuid": f"q{k:02d}", "paraphrases": [f"question {k}", f"paraphrase {k}"],
            "answers": [ANSWERS[k]], "prediction": pred, "generation": f" {pred}\nQ: more",
            "paraphrase_indices": [0, 1], "seconds": 0.25 * k}


def test_run_path_names(tmp_path):
    assert run_path(tmp_path, "avg", 5) == tmp_path / "avg-5.feather"
    assert run_path(tmp_path, "flex", indexs=[0, 2, 4]) == tmp_path / "diversity" / "flex-0,2,4.feather"
    assert run_path(tmp_path, "flex", indexs="1, 3") == tmp_path / "diversity" / "flex-1,3.feather"
    with pytest.raises(ValueError, match="num_paraphrases"):
        run_path(tmp_path, "avg")
    with pytest.raises(ValueError, match="indexs"):
        run_path(tmp_path, "avg", indexs="a,b")
    with pytest.raises(ValueError, match="method"):
        run_path(tmp_path, "a/b", 2)


def test_columns_types_and_scoring(tmp_path):
    path = run_path(tmp_path, "self_ensemble", 2)
    with RunWriter(path, method="self_ensemble", model="smollm2", dataset="webqa",
                   position_mode="aligned", bias=-math.log(2), checkpoint_every=4) as w:
        for k in range(5):
            w.add(record(k))
    table = feather.read_table(str(path))
    assert table.column_names == list(output.COLUMNS)
    assert table.schema.field("paraphrases").type == pa.list_(pa.string())
    assert table.schema.field("paraphrase_indices").type == pa.list_(pa.int32())
    rows = table.to_pylist()
    assert [r["uuid"] for r in rows] == [f"q{k:02d}" for k in range(5)]
    for k, r in enumerate(rows):
        src = record(k)
        for key in ("paraphrases", "answers", "prediction", "generation", "paraphrase_indices", "seconds"):
            assert r[key] == src[key]
        assert (r["method"], r["model"], r["dataset"], r["position_mode"]) == \
            ("self_ensemble", "smollm2", "webqa", "aligned")
        assert r["bias"] == pytest.approx(-math.log(2))
        assert r["correct"] is (k % 2 == 0)
        assert r["lemmas"] == [src["prediction"].lower()]


def test_per_prompt_rows_of_one_question_and_errors(tmp_path):
    w = RunWriter(tmp_path / "per_prompt-2.feather", method="per_prompt", checkpoint_every=1)
    w.add([{"uuid": "u", "answers": ["Paris"], "prediction": p, "paraphrase_indices": [i]}
           for i, p in enumerate(["Paris", "Lyon"])])
    assert w.is_done("u") and len(w) == 2
    rows = feather.read_table(str(tmp_path / "per_prompt-2.feather")).to_pylist()
    assert [r["correct"] for r in rows] == [True, False]
    assert rows[0]["position_mode"] is None and rows[0]["bias"] is None
    with pytest.raises(ValueError, match="already recorded"):
        w.add({"uuid": "u", "answers": ["x"], "prediction": "x"})
    with pytest.raises(ValueError, match="'prediction'"):
        w.add({"uuid": "v", "answers": ["x"]})
    with pytest.raises(TypeError, match="answers"):
        w.add({"uuid": "v", "answers": "Paris", "prediction": "x"})
    with pytest.raises(ValueError, match="unknown fields"):
        w.add({"uuid": "v", "answers": ["x"], "prediction": "x", "prompts": ["p"]})
    with pytest.raises(ValueError, match="checkpoint_every"):
        RunWriter(tmp_path / "x.feather", method="m", checkpoint_every=0)


def test_extra_columns(tmp_path):
    path = tmp_path / "avg-2.feather"
    with RunWriter(path, method="avg", extra_columns=("prompts",)) as w:
        w.add({"uuid": "u", "answers": ["a"], "prediction": "a", "prompts": ["p1", "p2"]})
    t = feather.read_table(str(path))
    assert t.column("prompts").to_pylist() == [["p1", "p2"]]
    with RunWriter(path, method="avg", resume=True) as w:  # kept without declaring it again
        w.add({"uuid": "v", "answers": ["b"], "prediction": "c"})
    t = feather.read_table(str(path))
    assert t.column("prompts").to_pylist() == [["p1", "p2"], None]
    assert t.column("correct").to_pylist() == [True, False]


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "avg-2.feather"
    w = RunWriter(path, method="avg", checkpoint_every=2)
    w.add(record(0))
    assert not path.exists()  # below the checkpoint size
    w.add(record(1))
    first = path.read_bytes()
    assert feather.read_table(str(path)).num_rows == 2

    def broken_write(table, dest, *a, **k):
        Path(dest).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(feather, "write_feather", broken_write)
    w.add(record(2))
    with pytest.raises(OSError, match="disk full"):
        w.add(record(3))
    assert path.read_bytes() == first  # the previous checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {python_dir!r})
    sys.path.insert(0, {test_dir!r})
    from test_output import record
    from segflex.output import RunWriter
    w = RunWriter({path!r}, method="avg", model="m", dataset="webqa", checkpoint_every=3, resume=True)
    for k in range(10):
        if w.is_done(record(k)["uuid"]):
            continue
        w.add(record(k))
        print(record(k)["uuid"], flush=True)
        if k == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush
    w.close()
""")


def run_worker(path: Path, kill_after: int) -> tuple[int, list[str]]:
    """Exit status of the worker and the questions it processed."""
    code = WORKER.format(python_dir=PYTHON_DIR, test_dir=os.path.dirname(__file__), path=str(path),
                         kill_after=kill_after)
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    return done.returncode, done.stdout.split()


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    clean = tmp_path / "clean" / "avg-2.feather"
    with RunWriter(clean, method="avg", model="m", dataset="webqa", checkpoint_every=3) as w:
        for k in range(10):
            w.add(record(k))

    resumed = tmp_path / "resumed" / "avg-2.feather"
    status, processed = run_worker(resumed, kill_after=7)
    assert status == -signal.SIGKILL
    assert processed == [f"q{k:02d}" for k in range(8)]
    partial = feather.read_table(str(resumed))
    # checkpoints after 3 and 6 questions; questions 6 and 7 were added but never written
    assert partial.column("uuid").to_pylist() == [f"q{k:02d}" for k in range(6)]
    status, processed = run_worker(resumed, kill_after=-1)
    assert status == 0
    assert processed == [f"q{k:02d}" for k in range(6, 10)]  # only the missing questions
    assert feather.read_table(str(resumed)).equals(feather.read_table(str(clean)))
    assert feather.read_table(str(clean)).column("uuid").to_pylist() == [f"q{k:02d}" for k in range(10)]


def test_resume_checks_run_identity_and_overwrites_without_resume(tmp_path):
    path = tmp_path / "avg-2.feather"
    with RunWriter(path, method="avg", model="m", dataset="webqa") as w:
        w.add(record(0))
    with pytest.raises(ValueError, match="model"):
        RunWriter(path, method="avg", model="other", dataset="webqa", resume=True)
    w = RunWriter(path, method="avg", model="m", dataset="webqa", resume=True)
    assert w.is_done("q00") and not w.is_done("q01")
    fresh = RunWriter(path, method="avg", model="m", dataset="webqa")  # resume=False: start over
    fresh.add(record(5))
    fresh.close()
    assert feather.read_table(str(path)).column("uuid").to_pylist() == ["q05"]
    (tmp_path / "other.feather").write_bytes(b"")
    feather.write_feather(pa.table({"a": [1]}), str(tmp_path / "other.feather"))
    with pytest.raises(ValueError, match="not a run file"):
        RunWriter(tmp_path / "other.feather", method="avg", resume=True)


def test_write_table_accepts_dataframe(tmp_path):
    import pandas as pd

    p = output.write_table(tmp_path / "sub" / "t.feather", pd.DataFrame({"x": [1, 2]}))
    assert output.read_run(p)["x"].tolist() == [1, 2]
    with pytest.raises(TypeError, match="table"):
        output.write_table(tmp_path / "t.feather", [1, 2])
    with pytest.raises(ValueError, match="does not exist"):
        output.read_run(tmp_path / "missing.feather")
