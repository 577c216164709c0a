"""Lemmatisation, partial matching, accuracies, oracles, the comparison table and plot.

The matching reference below works on joined strings (a different method
from the list scan under test); accuracies are counted by hand.
"""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segflex import evaluate


def ref_contains(hay: list[str], needle: list[str]) -> bool:
    """Contiguous run test by string search with a separator that no token contains."""
    if not needle:
        return False
    return "\x00" + "\x00".join(needle) + "\x00" in "\x00" + "\x00".join(hay) + "\x00"


tokens = st.lists(st.sampled_from(["a", "b", "c", "ab"]), max_size=7)


@given(pred=tokens, aliases=st.lists(tokens, max_size=4), bidi=st.booleans())
def test_partial_match_against_string_reference(pred, aliases, bidi):
    expected = any(ref_contains(pred, a) or (bidi and ref_contains(a, pred)) for a in aliases)
    assert evaluate.partial_match(pred, aliases, bidirectional=bidi) == expected


def test_contains_run_edges():
    assert evaluate.contains_run(["x", "y"], ["x", "y"])
    assert not evaluate.contains_run(["x"], ["x", "y"])
    assert not evaluate.contains_run(["x"], [])
    assert not evaluate.contains_run([], [])


def test_lemmas_lowercase_and_offline_pipeline():
    nlp = evaluate.get_nlp()
    assert evaluate.get_nlp() is nlp  # loaded once
    assert evaluate.pipeline_name()
    lem = evaluate.lemmatize(["The Cats were running to Paris.", "Mice", "  ", "Washington, D.C."])
    assert lem[0] == ["the", "cat", "be", "run", "to", "paris"]
    assert lem[1] == ["mouse"]
    assert lem[2] == []
    assert lem[3][0] == "washington" and "," not in lem[3]
    with pytest.raises(TypeError, match="texts"):
        evaluate.lemmatize("one string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        evaluate.lemmatize(["ok", 3])


@pytest.mark.parametrize("prediction, answers, uni, bi", [
    ("The capital is Paris.", ["Paris"], True, True),
    ("Shakespeare wrote it", ["William Shakespeare", "Shakespeare"], True, True),
    ("William", ["William Shakespeare"], False, True),
    ("Parisian food", ["Paris"], False, False),
    ("mice", ["mouse"], True, True),
    ("two mice ran", ["mouse"], True, True),
    ("", ["Paris"], False, False),
    ("Lyon", ["Paris", "City of Light"], False, False),
    ("New York City", ["New York City", "New York"], True, True),
    ("York", ["New York"], False, True),
])
def test_is_correct_examples(prediction, answers, uni, bi):
    assert evaluate.is_correct(prediction, answers) is uni
    assert evaluate.is_correct(prediction, answers, bidirectional=True) is bi


def test_score_batched_equals_one_by_one():
    preds = ["Paris", "London is big", "", "Shakespeare", "red"]
    answers = [["Paris"], ["Berlin"], ["x"], ["William Shakespeare", "Shakespeare"], ["green", "blue"]]
    lemmas, correct = evaluate.score(preds, answers)
    assert correct == [True, False, False, True, False]
    assert lemmas[1] == ["london", "be", "big"]
    assert correct == [evaluate.is_correct(p, a) for p, a in zip(preds, answers)]
    with pytest.raises(ValueError, match="answers"):
        evaluate.score(["a"], [])
    with pytest.raises(TypeError, match=r"answers\[0\]"):
        evaluate.score(["a"], ["Paris"])


def test_extract_prediction():
    assert evaluate.extract_prediction("  Paris\n\nQ: next?\nA: x") == "Paris"
    assert evaluate.extract_prediction(" New York City\nfoo", first_word=True) == "New"
    assert evaluate.extract_prediction("\n\n") == ""
    assert evaluate.extract_prediction("", first_word=True) == ""
    with pytest.raises(TypeError, match="generation"):
        evaluate.extract_prediction(None)


def test_self_consistency():
    assert evaluate.self_consistency("Paris", ["Paris", "paris.", "Lyon", "The city of Paris"]) == 0.75
    # bidirectional: a sample inside the greedy answer counts too
    assert evaluate.self_consistency("New York City", ["York", "Boston"]) == 0.5
    assert evaluate.self_consistency("Paris", []) == 0.0
    assert evaluate.self_consistency("", ["Paris"]) == 0.0


# ------------------------------------------------------------------ run files

# per_prompt-style run: 3 questions x 3 paraphrases, correctness by hand:
# u1: T F F, u2: T T T, u3: F F F
FLAGS = {"u1": [True, False, False], "u2": [True, True, True], "u3": [False, False, False]}


def per_prompt_frame(with_correct: bool = True) -> pd.DataFrame:
    rows = []
    for uid, flags in FLAGS.items():
        for i, ok in enumerate(flags):
            row = {"uuid": uid, "paraphrases": [f"{uid} p{i}"], "answers": ["Paris"],
                   "prediction": "Paris" if ok else "Lyon", "generation": "x",
                   "method": "per_prompt", "model": "m", "dataset": "webqa",
                   "paraphrase_indices": [i]}
            if with_correct:
                row["correct"] = ok
            rows.append(row)
    return pd.DataFrame(rows)


def write(df: pd.DataFrame, path):
    feather.write_feather(pa.Table.from_pandas(df, preserve_index=False), str(path))
    return path


def test_accuracy_and_oracle(tmp_path):
    df = per_prompt_frame()
    assert evaluate.accuracy(df) == pytest.approx(4 / 9)
    o = evaluate.oracle(df)
    assert (o["or"], o["and"], o["mean"], o["questions"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3),
                                                              pytest.approx(4 / 9), 3)
    o1 = evaluate.oracle(df, num_paraphrases=1)
    assert o1["or"] == o1["and"] == o1["mean"] == pytest.approx(2 / 3)
    o12 = evaluate.oracle(df, indexs=[1, 2])
    assert o12["or"] == o12["and"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="lacks paraphrases"):
        evaluate.oracle(df, num_paraphrases=4)
    curve = evaluate.oracle_curve(df)
    assert list(curve["num_paraphrases"]) == [1, 2, 3]
    assert list(curve["or"]) == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert list(curve["and"]) == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    # without a 'correct' column the file is scored from prediction and answers
    path = write(per_prompt_frame(with_correct=False), tmp_path / "per_prompt-3.feather")
    assert evaluate.accuracy(path) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate.accuracy(tmp_path / "none.feather")


def test_compare_table_and_plot(tmp_path):
    p1 = write(per_prompt_frame(), tmp_path / "per_prompt-3.feather")
    fused = pd.DataFrame([
        {"uuid": u, "paraphrases": ["a", "b", "c"], "answers": ["Paris"], "prediction": pred,
         "generation": pred, "paraphrase_indices": [0, 1, 2]}
        for u, pred in (("u1", "Paris"), ("u2", "Paris!"), ("u3", "Rome"))
    ])
    p2 = write(fused, tmp_path / "avg-3.feather")  # method and N from the file name
    (tmp_path / "diversity").mkdir()
    p3 = write(fused.assign(paraphrase_indices=[[0, 2]] * 3, method="flex"),
               tmp_path / "diversity" / "flex-0,2.feather")
    table = evaluate.compare([p1, p2, p3])
    assert list(table["method"]) == ["per_prompt", "avg", "flex"]
    assert list(table["num_paraphrases"]) == [3, 3, 2]
    assert list(table["indices"]) == ["0,1,2", "0,1,2", "0,2"]
    assert list(table["accuracy"]) == pytest.approx([4 / 9, 2 / 3, 2 / 3])
    assert table["oracle_or"].iloc[0] == pytest.approx(2 / 3)
    assert table["oracle_and"].iloc[0] == pytest.approx(1 / 3)
    assert math.isnan(table["oracle_or"].iloc[1])
    assert list(table["questions"]) == [3, 3, 3]
    pivot = evaluate.accuracy_table(table)
    assert pivot.loc["avg", 3] == pytest.approx(2 / 3) and pivot.loc["flex", 2] == pytest.approx(2 / 3)
    assert math.isnan(pivot.loc["avg", 2])
    png = evaluate.plot_comparison(table, tmp_path / "plots" / "compare.png", title="sample")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="table"):
        evaluate.plot_comparison(table.iloc[:0], tmp_path / "empty.png")


def pair_frames():
    """4 questions x 3 paraphrases with lemmas and correctness given, and three pair runs.
    Counted by hand (i, j: consistency, diversity): (0,1) 2/4, 1/4; (0,2) 1/4, 2/4;
    (1,2) 1/4, 3/4. Empty lemmas never match."""
    preds = {  # question: [(lemmas, correct) for paraphrase 0, 1, 2]
        "q1": [(["paris"], True), (["paris"], True), (["rome"], False)],
        "q2": [(["london"], False), (["berlin"], True), (["london"], False)],
        "q3": [(["new", "york"], True), (["york"], True), (["boston"], False)],
        "q4": [([], False), (["madrid"], False), (["madrid"], False)],
    }
    single = pd.DataFrame([
        {"uuid": q, "prediction": " ".join(lem), "lemmas": lem, "correct": ok, "paraphrase_indices": [i]}
        for q, rows in preds.items() for i, (lem, ok) in enumerate(rows)
    ])

    def pair_run(indices, correct, method="avg"):
        return pd.DataFrame([{"uuid": q, "prediction": "x", "correct": ok, "paraphrase_indices": indices,
                              "method": method} for q, ok in zip(preds, correct)])

    pairs = [pair_run([0, 1], [True, True, True, False]),       # 3/4, gain 0
             pair_run([2, 0], [True, False, True, False]),      # 2/4, gain 0
             pair_run([1, 2], [True, True, False, False])]      # 2/4, gain -1/4
    return single, pairs


def test_pair_analysis_counts_by_hand():
    single, pairs = pair_frames()
    table = evaluate.pair_analysis(single, pairs)
    assert [(int(i), int(j)) for i, j in zip(table["i"], table["j"])] == [(0, 1), (0, 2), (1, 2)]
    assert list(table["acc_i"]) == pytest.approx([2 / 4, 2 / 4, 3 / 4])
    assert list(table["acc_j"]) == pytest.approx([3 / 4, 0.0, 0.0])
    assert list(table["consistency"]) == pytest.approx([2 / 4, 1 / 4, 1 / 4])
    assert list(table["diversity"]) == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    assert list(table["acc_avg"]) == pytest.approx([3 / 4, 2 / 4, 2 / 4])
    assert list(table["gain_avg"]) == pytest.approx([0.0, 0.0, -1 / 4])
    corr = evaluate.pair_correlations(table)
    gains, cons, div = [0.0, 0.0, -0.25], [0.5, 0.25, 0.25], [0.25, 0.5, 0.75]
    import numpy as np
    assert corr["r_consistency"].iloc[0] == pytest.approx(np.corrcoef(cons, gains)[0, 1])
    assert corr["r_diversity"].iloc[0] == pytest.approx(np.corrcoef(div, gains)[0, 1])
    # without pair runs: the single-paraphrase columns only
    assert "gain_avg" not in evaluate.pair_analysis(single).columns


def test_pair_analysis_errors():
    single, pairs = pair_frames()
    with pytest.raises(ValueError, match="single-paraphrase"):
        evaluate.pair_analysis(pairs[0])
    mixed = pd.concat([pairs[0], pairs[2]])
    with pytest.raises(ValueError, match="one pair"):
        evaluate.pair_analysis(single, [mixed])
    far = pairs[0].assign(paraphrase_indices=[[0, 7]] * 4)
    with pytest.raises(ValueError, match="no questions"):
        evaluate.pair_analysis(single, [far])


def test_evaluate_command_pairs(tmp_path, capsys):
    from segflex.cli import main
    single, pairs = pair_frames()
    write(single.assign(method="per_prompt", answers=[["x"]] * len(single)), tmp_path / "per_prompt-3.feather")
    (tmp_path / "diversity").mkdir()
    for p in pairs:
        ix = ",".join(str(i) for i in p["paraphrase_indices"].iloc[0])
        write(p.assign(answers=[["x"]] * len(p)), tmp_path / "diversity" / f"avg-{ix}.feather")
    assert main(["evaluate", str(tmp_path), "--png", "", "--pairs"]) == 0
    out = capsys.readouterr().out
    assert "consistency" in out and "r_diversity" in out and "3 pair runs" in out
