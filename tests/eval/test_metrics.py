"""The metrics of `tokedge eval` (tokedge/eval/metrics.py): from their definitions on hand-made cases,
and equal to lmms-eval's own scoring functions on the same predictions (lmms-eval 0.7.3, installed
`--no-deps` by `make lmms-eval`; those tests skip with the reason when it is absent)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tokedge.eval import metrics as m

# predictions as models write them: clean words, capitals, trailing periods, sentences
YESNO = ["yes", "no", "Yes", "No", "yes", "no", "no", "yes", "Yes", "No", "yes", "yes"]
TRUTH = ["yes", "no", "no", "yes", "yes", "yes", "no", "no", "yes", "no", "no", "yes"]


def test_pope_from_its_definition():
    labels = [m.pope_label(p) for p in ["Yes.", "No, there is not.", "There is no dog.", "I think so", "not sure"]]
    assert labels == ["yes", "no", "no", "yes", "no"]
    s = m.pope_scores(["yes", "yes", "no", "no"], ["yes", "no", "yes", "no"])
    assert s == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}


def test_mme_from_its_definition():
    assert [m.mme_label(p) for p in ["Yes", "no.", "y", "n", "x", "Yes, it is", "Nope", "maybe"]] == \
        ["yes", "no", "yes", "no", "other", "yes", "no", "other"]
    rows = [("color", "a", True), ("color", "a", True), ("color", "b", True), ("color", "b", False),
            ("code_reasoning", "c", False), ("code_reasoning", "c", False)]
    s = m.mme_scores(rows)
    assert s["color"] == pytest.approx(100 * (0.75 + 0.5))
    assert s["perception"] == s["color"] and s["cognition"] == 0.0
    assert s["acc"] == pytest.approx(3 / 6) and s["acc_plus"] == pytest.approx(1 / 3)


def test_vqa_accuracy_from_its_definition():
    answers = ["2"] * 2 + ["3"] * 8
    # "two" normalises to "2": each subset of 9 holds 1 or 2 "2"s -> min(n/3, 1) = 1/3 or 2/3
    assert m.vqa_accuracy("two", answers) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert m.vqa_accuracy("3", answers) == 1.0
    assert m.vqa_accuracy("The dog.", ["dog"] * 10) == 1.0
    assert m.vqa_normalize("1.5 cats!") == "1.5 cats" and m.vqa_normalize("dont") == "don't"


def test_exact_match_and_choice_letter():
    assert m.exact_match("Red.", ["red"]) == 1.0 and m.exact_match("dark red", ["red"]) == 0.0
    letters = ("A", "B", "C", "D")
    cases = {"B": "B", "B.": "B", "(C) cat": "C", "D: dog": "D", "The answer is A.": "A", "I pick (B)": "B",
             "none": ""}
    assert {p: m.choice_letter(p, letters) for p in cases} == cases


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    rows = [m.Scored(float(i % 3 == 0)) for i in range(60)]
    mean = lambda rs: sum(r.score for r in rs) / len(rs)
    a = m.bootstrap_ci(rows, mean, seed=0)
    assert a == m.bootstrap_ci(rows, mean, seed=0) != m.bootstrap_ci(rows, mean, seed=1)
    assert a[0] < mean(rows) < a[1]
    # grouped rows move together: two identical halves of each group give the same interval as one
    grouped = [m.Scored(r.score, unit=str(i)) for i, r in enumerate(rows) for _ in range(2)]
    assert m.bootstrap_ci(grouped, mean, seed=0) == a


# --- the same predictions through lmms-eval's scoring functions ---------------------------------------


@pytest.fixture(scope="module")
def lmms():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make lmms-eval)")
    from lmms_eval.tasks.mme import utils as mme
    from lmms_eval.tasks.pope import utils as pope
    from lmms_eval.tasks.scienceqa import utils as sqa
    from lmms_eval.tasks.textvqa import utils as textvqa
    from lmms_eval.tasks.vqav2 import utils as vqav2

    return {"pope": pope, "mme": mme, "textvqa": textvqa, "vqav2": vqav2, "sqa": sqa}


def test_pope_equals_lmms_eval(lmms):
    pope = lmms["pope"]
    docs = [{"question_id": i, "answer": t} for i, t in enumerate(TRUTH)]
    per = [pope.pope_process_results(d, [p]) for d, p in zip(docs, YESNO)]
    ours = m.pope_scores([m.pope_label(p) for p in YESNO], TRUTH)
    assert ours["accuracy"] == pytest.approx(pope.pope_aggregate_accuracy([r["pope_accuracy"] for r in per]))
    assert ours["precision"] == pytest.approx(pope.pope_aggregate_precision([r["pope_precision"] for r in per]))
    assert ours["recall"] == pytest.approx(pope.pope_aggregate_recall([r["pope_recall"] for r in per]))
    assert ours["f1"] == pytest.approx(pope.pope_aggregate_f1_score([r["pope_f1_score"] for r in per]))
    # lmms-eval 0.7.3's yes-ratio counts the ground truth's yeses; POPE's (ours) counts the predictions'
    truth_yes = pope.pope_aggregate_yes_ratio([r["pope_yes_ratio"] for r in per])
    assert truth_yes == pytest.approx(m.pope_scores(TRUTH, TRUTH)["yes_ratio"])


def test_mme_equals_lmms_eval(lmms):
    mme = lmms["mme"]
    preds = ["Yes", "No", "yes.", "no", "Yes, it is.", "No", "n", "y", "maybe", "No"]
    truth = ["Yes", "No", "No", "No", "Yes", "Yes", "No", "Yes", "Yes", "No"]
    cats = ["color"] * 4 + ["OCR"] * 4 + ["code_reasoning"] * 2
    images = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    per = [mme.mme_process_results({"question_id": img, "answer": t, "category": c}, [p])
           for img, t, c, p in zip(images, truth, cats, preds)]
    perception = mme.mme_aggregate_results([r["mme_perception_score"] for r in per if "mme_perception_score" in r])
    cognition = mme.mme_aggregate_results([r["mme_cognition_score"] for r in per if "mme_cognition_score" in r])
    ours = m.mme_scores([(c, img, m.mme_label(p) == t.lower()) for c, img, p, t in zip(cats, images, preds, truth)])
    assert ours["perception"] == pytest.approx(perception) and ours["cognition"] == pytest.approx(cognition)


VQA_PREDS = ["2", "two", "Two.", "the dog", "dog!", "a red car", "red-car", "1,000", "yes", "dont know", "3 ",
             "It's blue", "blue"]


def test_vqav2_accuracy_equals_lmms_eval(lmms):
    vqav2 = lmms["vqav2"]
    answer_sets = [["2"] * 3 + ["two"] * 2 + ["3"] * 5, ["dog"] * 10, ["red car", "red", "car"] + ["red car"] * 7,
                   ["1000"] * 4 + ["1,000"] * 6, ["yes", "no"] * 5, ["don't know"] * 10, ["3"] * 2 + ["4"] * 8,
                   ["blue"] * 9 + ["it's blue"]]
    for answers in answer_sets:
        doc = {"question_id": 1, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
        for pred in VQA_PREDS:
            theirs = vqav2.vqav2_process_results(copy.deepcopy(doc), [pred])["exact_match"]
            assert m.vqa_accuracy(pred, answers) == pytest.approx(theirs), (pred, answers)


def test_textvqa_accuracy_equals_lmms_eval(lmms):
    textvqa = lmms["textvqa"]
    answer_sets = [["stop"] * 8 + ["STOP", "sign"], ["coca cola"] * 5 + ["coca-cola"] * 5, ["12:30"] * 10,
                   ["john's"] * 6 + ["johns"] * 4]
    for answers in answer_sets:
        for pred in [*VQA_PREDS, "STOP", "Stop.", "coca-cola", "12:30", "John's", "johns"]:
            theirs = textvqa.textvqa_process_results({"question_id": 1, "answers": list(answers)}, [pred])["exact_match"]
            assert m.vqa_accuracy(pred, answers, tokenize=True) == pytest.approx(theirs), (pred, answers)


def test_gqa_exact_match_equals_lmms_eval(lmms):
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    preds, golds = ["Red", "red.", "the table", "Yes", "no!", "left"], ["red", "red", "table", "yes", "no", "right"]
    theirs = exact_match_hf_evaluate(preds, golds, ignore_case=True, ignore_punctuation=True)["exact_match"]
    assert np.mean([m.exact_match(p, [g]) for p, g in zip(preds, golds)]) == pytest.approx(theirs)


def test_multiple_choice_equals_lmms_eval(lmms):
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    letters = ["A", "B", "C", "D"]
    preds = ["A", "B.", "C. a cat", "(D)", "The answer is B.", "D", "b", "(A) red", "C: blue"]
    for pred in preds:
        assert m.choice_letter(pred, letters) == extract_mcq_answer(pred, letters), pred
    # ScienceQA's own rule (LLaVA's): the bare letter or "X." at the start
    sqa = lmms["sqa"]
    for pred, answer in [("A", 0), ("B. dog", 1), ("C", 1), ("(B)", 1)]:
        doc = {"choices": ["x", "y", "z"], "answer": answer}
        if pred.startswith("("):  # outside ScienceQA's two forms: it scores 0 where we read the letter
            continue
        assert sqa.sqa_process_results(doc, [pred])["exact_match"] == m.choice_match(pred, "ABC"[answer], letters)
