"""Data loaders: the bundled sample, file formats, prompts, paraphrase selection and cache.

Expected values are built here from the raw files with the json module and
the prompt format written out literally, not with segflex.data's helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from segflex import data

SAMPLE = Path(data.__file__).resolve().parent / "sample_data"
WEBQA_INSTR = "Answer the question based on general world knowledge. Provide a short and direct answer."
LAMA_INSTR = "Predict the [MASK] in the sentence in one word."


def raw_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ bundled sample


def test_sample_webqa_matches_raw_files():
    ds = data.load_dataset("webqa")
    test_rows = raw_jsonl(SAMPLE / "webqa" / "test.jsonl")
    train_rows = raw_jsonl(SAMPLE / "webqa" / "train.jsonl")
    cache = {r["uuid"]: r for r in raw_jsonl(SAMPLE / "webqa" / "paraphrases.jsonl")}
    assert len(ds.test) == len(test_rows) >= 120
    assert len(ds.train) == len(train_rows) >= 20
    assert len(ds) == len(ds.test)
    for q, row in zip(ds.test, test_rows):
        assert q.uuid == md5(row["question"])
        assert q.question == row["question"] == q.paraphrases[0]
        assert cache[q.uuid]["question"] == row["question"]
        assert list(q.paraphrases[1:]) == cache[q.uuid]["paraphrases"]
        assert len(q.paraphrases) == 6
        assert len(set(p.lower() for p in q.paraphrases)) == 6, q
        assert all(p.strip() == p and p for p in q.paraphrases)
        assert list(q.answers) == row["answers"] and q.answers
    test_q = {r["question"] for r in test_rows}
    assert not test_q & {r["question"] for r in train_rows}, "train and test overlap"
    assert len({q.uuid for q in ds.test}) == len(ds.test)


def lama_expected(rows: list[dict]) -> dict[str, dict]:
    """uuid -> manual prompts in file order, the set of auto prompts, aliases."""
    out: dict[str, dict] = {}
    for r in rows:
        d = out.setdefault(r["uuid"], {"manual": [], "auto": [], "answers": r["obj_aliases"]})
        text = r["template"].replace("[X]", r["sub_ent"]).replace("[Y]", "[MASK]")
        (d["manual"] if r["is_manual"] else d["auto"]).append(text)
    return out


def test_sample_myriadlama_matches_raw_file():
    rows = raw_jsonl(SAMPLE / "myriadlama" / "myriadlama.jsonl")
    expected = lama_expected(rows)
    assert len(expected) >= 30
    ds = data.load_dataset("myriadlama")
    assert ds.instruction == LAMA_INSTR
    got = ds.test + ds.train
    assert sorted(q.uuid for q in got) == sorted(expected)
    assert not {q.uuid for q in ds.test} & {q.uuid for q in ds.train}
    assert len(ds.test) == 30 and len(ds.train) >= 5
    for q in got:
        e = expected[q.uuid]
        assert len(e["manual"]) >= 5
        assert list(q.paraphrases[:len(e["manual"])]) == e["manual"]
        assert sorted(q.paraphrases[len(e["manual"]):]) == sorted(e["auto"])
        assert q.question == q.paraphrases[0]
        assert list(q.answers) == e["answers"]
        assert all("[MASK]" in p and "[X]" not in p and "[Y]" not in p for p in q.paraphrases)


def test_myriadlama_auto_order_depends_only_on_uuid(tmp_path):
    rows = raw_jsonl(SAMPLE / "myriadlama" / "myriadlama.jsonl")
    a = {q.uuid: q for q in data.load_myriadlama(SAMPLE / "myriadlama" / "myriadlama.jsonl",
                                                   test_size=30).test}
    # Same rows, other uuids' rows reversed and dropped: a question's order must not move.
    keep = list(a)[:3]
    manual = [r for r in rows if r["uuid"] in keep and r["is_manual"]]
    auto = [r for r in reversed(rows) if r["uuid"] in keep and not r["is_manual"]]
    sub = auto[:4] + manual + auto[4:]
    path = tmp_path / "lama.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sub))
    b = data.load_myriadlama(path, test_size=1)
    for q in b.test + b.train:
        # auto templates came in reversed file order, the drawn order is the same
        assert q.paraphrases == a[q.uuid].paraphrases


def test_myriadlama_split_is_seeded_and_sized(tmp_path):
    rows = []
    for u in range(40):
        for t in range(6):
            # is_manual written as the strings some dumps use
            rows.append({"uuid": f"u{u:02d}", "rel_uri": "P1", "obj_aliases": [f"o{u}"],
                         "is_manual": str(t < 5), "template": f"[X] t{t} [Y].", "sub_ent": f"s{u}"})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = data.load_myriadlama(path, test_size=25)
    b = data.load_myriadlama(path, test_size=25)
    c = data.load_myriadlama(path, test_size=25, split_seed=7)
    assert [q.uuid for q in a.test] == [q.uuid for q in b.test]
    assert len(a.test) == 25 and len(a.train) == 15
    assert {q.uuid for q in a.test} != {q.uuid for q in c.test}
    # test questions keep data order
    assert [q.uuid for q in a.test] == sorted(q.uuid for q in a.test)
    with pytest.raises(ValueError, match="test_size"):
        data.load_myriadlama(path, test_size=40)
    with pytest.raises(ValueError, match="manual"):
        data.load_myriadlama(path, test_size=5, min_manual=6)
    assert all(q.paraphrases[:5] == tuple(f"s{q.uuid[1:].lstrip('0') or '0'} t{t} [MASK]." for t in range(5))
               for q in a.test)


# ------------------------------------------------------------------ prompts


def test_prompt_literal_with_five_train_questions(tmp_path):
    train = [{"question": f"train question {i}?", "answers": [f"ans{i}", f"alt{i}"]} for i in range(5)]
    test = [{"question": "what is the capital of france?", "answers": ["Paris"]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    ds = data.load_webqa(tmp_path)
    prompt = ds.prompt("what is the capital of france?")
    head, _, rest = prompt.partition("\n\n")
    assert head == WEBQA_INSTR
    assert prompt.endswith("\n\nQ: what is the capital of france?\nA:")
    shots = rest[: -len("\n\nQ: what is the capital of france?\nA:")].split("\n\n")
    # all five training questions, each with its first answer only
    assert sorted(shots) == sorted(f"Q: train question {i}?\nA: ans{i}" for i in range(5))
    assert "alt" not in prompt


def test_prompt_parts_and_few_shot_seed():
    ds = data.load_dataset("webqa")
    train_rows = raw_jsonl(SAMPLE / "webqa" / "train.jsonl")
    picks = random.Random(42).sample(range(len(train_rows)), 5)
    few = "\n\n".join(f"Q: {train_rows[i]['question']}\nA: {train_rows[i]['answers'][0]}" for i in picks)
    assert ds.few_shot == few
    q = ds[3]
    parts = ds.prompt_parts(q, num_paraphrases=4)
    assert parts.prefix == f"{WEBQA_INSTR}\n\n{few}\n\nQ: "
    assert parts.answer_cue == "\nA:"
    assert parts.paraphrases == q.paraphrases[:4]
    assert parts.indices == (0, 1, 2, 3)
    for i, p in enumerate(q.paraphrases[:4]):
        assert parts.prompt(i) == f"{WEBQA_INSTR}\n\n{few}\n\nQ: {p}\nA:"
    assert ds.prompts(q, indexs=[0, 2, 4]) == [f"{WEBQA_INSTR}\n\n{few}\n\nQ: {q.paraphrases[i]}\nA:"
                                              for i in (0, 2, 4)]
    assert ds.prompt_parts(q, indexs="5,1").indices == (5, 1)


def test_myriadlama_prompt_uses_its_instruction():
    ds = data.load_dataset("myriadlama")
    q = ds[0]
    p = ds.prompt(q.paraphrases[0])
    assert p.startswith(LAMA_INSTR + "\n\nQ: ")
    assert p.endswith(f"\n\nQ: {q.paraphrases[0]}\nA:")
    assert p.count("\nA: ") == 5  # five few-shot answers


# ------------------------------------------------------------------ selection


def test_select_paraphrases_and_errors():
    q = data.Question("u1", "p0", ("p0", "p1", "p2", "p3"), ("a",))
    assert q.select(num_paraphrases=2) == ["p0", "p1"]
    assert q.select(indexs=[0, 2, 3]) == ["p0", "p2", "p3"]
    assert q.select(indexs="3, 1") == ["p3", "p1"]
    with pytest.raises(ValueError, match="num_paraphrases.*only 4"):
        q.select(num_paraphrases=5)
    with pytest.raises(ValueError, match="indexs.*4 out of range"):
        q.select(indexs=[0, 4])
    with pytest.raises(ValueError, match="exclusive"):
        q.select(num_paraphrases=2, indexs=[0])
    with pytest.raises(ValueError, match="num_paraphrases"):
        q.select(num_paraphrases=0)
    with pytest.raises(ValueError, match="indexs"):
        q.select(indexs="0,x")
    with pytest.raises(TypeError, match="num_paraphrases"):
        q.select(num_paraphrases=2.0)


def test_iter_batches():
    qs = [data.Question(str(i), "q", ("q",), ("a",)) for i in range(7)]
    batches = list(data.iter_batches(qs, 3))
    assert [[q.uuid for q in b] for b in batches] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    with pytest.raises(ValueError, match="batch_size"):
        list(data.iter_batches(qs, 0))


# ------------------------------------------------------------------ file formats


ROWS = [
    {"question": "what is the capital of peru?", "answers": ["Lima"], "url": "http://x/1"},
    {"question": "who wrote hamlet?", "answers": ["William Shakespeare", "Shakespeare"], "url": "http://x/2"},
    {"question": "what color is snow?", "answers": ["white"], "url": "http://x/3"},
]
TRAIN = [{"question": f"t{i}?", "answers": [f"a{i}"], "url": ""} for i in range(6)]


def _write(fmt: str, folder: Path, split: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    if fmt == "jsonl":
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        (folder / f"{split}.json").write_text(json.dumps(rows))
    elif fmt == "parquet":
        pq.write_table(table, folder / f"{split}.parquet")
    elif fmt == "feather":
        feather.write_feather(table, folder / f"{split}.feather")
    elif fmt == "arrow":
        # Arrow IPC *stream*, as the datasets library writes its .arrow files
        with pa.OSFile(str(folder / f"{split}.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
    elif fmt == "save_to_disk":
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
        sub = folder / split
        sub.mkdir()
        half = max(1, len(rows) // 2)
        names = []
        for k, chunk in enumerate([rows[:half], rows[half:]]):
            if not chunk:
                continue
            name = f"data-{k:05d}-of-00002.arrow"
            t = pa.Table.from_pylist(chunk)
            with pa.OSFile(str(sub / name), "wb") as sink:
                with pa.ipc.new_stream(sink, t.schema) as w:
                    w.write_table(t)
            names.append({"filename": name})
        (sub / "state.json").write_text(json.dumps({"_data_files": names, "_split": split}))
        (sub / "dataset_info.json").write_text("{}")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "feather", "arrow", "save_to_disk"])
def test_webqa_formats(tmp_path, fmt):
    _write(fmt, tmp_path, "test", ROWS)
    _write(fmt, tmp_path, "train", TRAIN)
    cache = {r["question"]: [f"{r['question']} (v{k})" for k in range(1, 6)] for r in ROWS}
    data.write_paraphrase_cache(tmp_path / "paraphrases.jsonl", cache)
    ds = data.load_webqa(tmp_path)
    assert [q.question for q in ds.test] == [r["question"] for r in ROWS]
    assert [list(q.answers) for q in ds.test] == [r["answers"] for r in ROWS]
    assert [q.uuid for q in ds.test] == [md5(r["question"]) for r in ROWS]
    assert [q.question for q in ds.train] == [r["question"] for r in TRAIN]
    for q, r in zip(ds.test, ROWS):
        assert q.paraphrases == (r["question"], *[f"{r['question']} (v{k})" for k in range(1, 6)])


def test_myriadlama_parquet_and_save_to_disk_equal_jsonl(tmp_path):
    rows = raw_jsonl(SAMPLE / "myriadlama" / "myriadlama.jsonl")
    ref = data.load_myriadlama(SAMPLE / "myriadlama" / "myriadlama.jsonl", test_size=30)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "lama.parquet")
    a = data.load_myriadlama(tmp_path / "lama.parquet", test_size=30)
    folder = tmp_path / "disk"
    folder.mkdir()
    t = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    b = data.load_myriadlama(folder, test_size=30)
    assert a.test == ref.test and a.train == ref.train
    assert b.test == ref.test and b.train == ref.train


# ------------------------------------------------------------------ errors


def test_missing_file_and_field_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_webqa(tmp_path / "nope")
    with pytest.raises(ValueError, match="no test file"):
        data.load_webqa(tmp_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(ValueError, match="train"):
        data.load_webqa(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "t?", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl.*'answers'"):
        data.load_webqa(tmp_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q?", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="paraphrases_path"):
        data.load_webqa(tmp_path, paraphrases_path=tmp_path / "missing.jsonl")
    (tmp_path / "test.jsonl").write_text(2 * (json.dumps({"question": "q?", "answers": ["a"]}) + "\n"))
    with pytest.warns(UserWarning, match="1 repeated"):
        ds = data.load_webqa(tmp_path)  # no cache: only the original question
    assert len(ds) == 1
    assert ds[0].paraphrases == ("q?",)
    with pytest.raises(ValueError, match="only 1 paraphrases"):
        ds.check_paraphrases(num_paraphrases=5)
    with pytest.raises(ValueError, match="train: webqa has 1 training"):
        ds.few_shot  # noqa: B018
    lama = tmp_path / "lama.jsonl"
    lama.write_text(json.dumps({"uuid": "u", "rel_uri": "P1", "obj_aliases": ["o"], "is_manual": True,
                                "sub_ent": "s"}) + "\n")
    with pytest.raises(ValueError, match="'template'"):
        data.load_myriadlama(lama, test_size=1)
    with pytest.raises(ValueError, match="name"):
        data.load_dataset("squad")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        data.read_records(tmp_path / "x.csv")


# ------------------------------------------------------------------ paraphrase generation support


def test_paraphrase_prompt_structure():
    p = data.paraphrase_prompt("who wrote hamlet?")
    blocks = p.split("\n\n")
    assert "paraphrase" in blocks[0].lower() and "meaning" in blocks[0].lower()
    examples = blocks[1:-1]
    assert len(examples) == 5
    for b in examples:
        q, para = b.split("\n")
        assert q.startswith("Q: ") and para.startswith("Paraphrase: ")
    assert blocks[-1] == "Q: who wrote hamlet?\nParaphrase:"
    with pytest.raises(ValueError, match="question"):
        data.paraphrase_prompt("  ")
    assert data.clean_paraphrase(" Who is the author of Hamlet?\nQ: next") == "Who is the author of Hamlet?"
    assert data.clean_paraphrase("\n\n  x y \n") == "x y"
    assert data.clean_paraphrase("") == ""


def test_paraphrase_cache_roundtrip_and_merge(tmp_path):
    path = data.paraphrase_cache_path(tmp_path, model="org/My-Model")
    assert path.parent == tmp_path and path.name == "paraphrases-My-Model.jsonl"
    assert data.read_paraphrase_cache(path) == {}
    data.write_paraphrase_cache(path, {"q one?": ["a", "b"], "q two?": ["c"]})
    data.write_paraphrase_cache(path, {"q two?": ["d", "e"]})  # merge keeps "q one?"
    rows = raw_jsonl(path)
    assert {r["uuid"]: r["paraphrases"] for r in rows} == {md5("q one?"): ["a", "b"], md5("q two?"): ["d", "e"]}
    assert data.read_paraphrase_cache(path) == {md5("q one?"): ["a", "b"], md5("q two?"): ["d", "e"]}
    data.write_paraphrase_cache(path, {"q three?": ["f"]}, merge=False)
    assert data.read_paraphrase_cache(path) == {md5("q three?"): ["f"]}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
    # per-model cache picked by load_webqa(model=...)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q three?", "answers": ["x"]}) + "\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "t?", "answers": ["y"]}) + "\n")
    assert data.load_webqa(tmp_path, model="org/My-Model")[0].paraphrases == ("q three?", "f")
    assert data.load_webqa(tmp_path)[0].paraphrases == ("q three?",)
    assert os.path.basename(data.paraphrase_cache_path(tmp_path)) == "paraphrases.jsonl"
