"""Scorers for LLaVA answer files, checked against figures worked out by hand."""

from __future__ import annotations

import json

import pytest

from pipelines.evaluate.annotations import Annotation, find_missing, load_annotations
from pipelines.evaluate.scoring import (
    score,
    score_choice,
    score_vqa,
    score_yes_no,
)


def answer(qid, text, prompt="q"):
    """A LLaVA answer record as model_vqa writes it."""
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
            "metadata": {}}


# --- normalisation -----------------------------------------------------------------------------


# --- VQA accuracy ------------------------------------------------------------------------------


def ten(matching: int) -> list[str]:
    return ["cat"] * matching + ["dog"] * (10 - matching)


def test_score_vqa_counts_missing_as_wrong():
    annotations = {1: {"answers": ten(4)}, 2: {"answers": ten(2)}, 3: {"answer": "dog"}}
    result = score_vqa([answer(1, "cat"), answer(2, "cat")], annotations)
    # (1.0 + 0.6 + 0 for the missing q3) / 3
    assert result["accuracy"] == pytest.approx(1.6 / 3)
    assert (result["n"], result["answered"], result["missing"]) == (3, 2, 1)


# --- yes/no ------------------------------------------------------------------------------------


def test_score_yes_no_by_hand():
    annotations = {"q1": "yes", "q2": "yes", "q3": "no", "q4": "no", "q5": "yes", "q6": "no"}
    answers = [
        answer("q1", "Yes, there is."),                 # TP
        answer("q2", "No, there isn't."),               # FN
        answer("q3", "Yes."),                           # FP
        answer("q4", "There is not a dog in the image."),  # TN
        # q5 (yes) missing -> FN; q6 (no) missing -> wrong, neither TN nor FP
    ]
    result = score_yes_no(answers, annotations)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (1, 1, 1, 2)
    assert result["accuracy"] == pytest.approx(2 / 6)
    assert result["precision"] == pytest.approx(1 / 2)
    assert result["recall"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # = 0.4
    assert result["f1"] == pytest.approx(0.4)
    assert result["yes_ratio"] == pytest.approx(2 / 4)
    assert (result["n"], result["answered"], result["missing"]) == (6, 4, 2)


def test_score_yes_no_rejects_non_yes_no_label():
    with pytest.raises(ValueError, match="q9"):
        score_yes_no([answer("q9", "yes")], {"q9": "maybe"})


# --- multiple choice ---------------------------------------------------------------------------


def test_score_choice_by_hand():
    annotations = {1: "A", 2: "B", 3: "C", 4: "D", 5: "A"}
    answers = [answer(1, "A"), answer(2, "The answer is B."), answer(3, "(D)"),
               answer(4, "Not sure")]  # 5 missing
    result = score_choice(answers, annotations)
    assert result["accuracy"] == pytest.approx(2 / 5)
    assert (result["n"], result["answered"], result["missing"], result["unparsed"]) == (5, 4, 1, 1)


def test_score_choice_rejects_bad_label():
    with pytest.raises(ValueError, match="question_id=7"):
        score_choice([], {7: "Z"})


# --- dispatcher and errors ---------------------------------------------------------------------


def test_score_dispatches_and_matches_int_and_str_ids():
    result = score([answer("1", "yes")], {1: "yes", 2: "no"}, kind="yesno")
    assert result["accuracy"] == pytest.approx(1 / 2)
    assert result["missing"] == 1


def test_score_takes_kind_from_annotations():
    annotations = {1: Annotation(1, ("B",), "choice")}
    assert score([answer(1, "B")], annotations)["accuracy"] == 1.0


def test_score_kind_errors():
    with pytest.raises(ValueError, match="kind"):
        score([], {1: "yes"})  # nothing declares a kind
    with pytest.raises(ValueError, match="unknown kind"):
        score([], {1: "yes"}, kind="bleu")
    with pytest.raises(ValueError, match="question_id=1"):
        score([], {1: Annotation(1, ("B",), "choice")}, kind="vqa")


def test_answer_without_annotation_names_the_id():
    with pytest.raises(ValueError, match="question_id=42"):
        score([answer(1, "cat"), answer(42, "dog")], {1: "cat"}, kind="vqa")


def test_duplicate_answer_names_the_id():
    with pytest.raises(ValueError, match="question_id=1"):
        score([answer(1, "cat"), answer(1, "dog")], {1: "cat"}, kind="vqa")


def test_answer_without_text_names_the_id():
    with pytest.raises(ValueError, match="question_id=3"):
        score([{"question_id": 3}], {3: "cat"}, kind="vqa")


def test_no_annotations_is_an_error():
    with pytest.raises(ValueError, match="no annotations"):
        score([], {}, kind="vqa")


def test_pope_is_scored_per_category_and_their_f1_averaged():
    # LLaVA's eval_pope.py scores adversarial, popular and random apart; papers report their mean F1.
    def pope(qid, category, reply):
        return {**answer(qid, reply), "metadata": {"category": category}}
    annotations = {1: "yes", 2: "no", 3: "yes", 4: "no", 5: {"answer": "yes", "category": "random"}, 6: "no"}
    answers = [pope(1, "adversarial", "Yes"), pope(2, "adversarial", "Yes"),   # TP, FP
               pope(3, "random", "Yes"), pope(4, "random", "No"),              # TP, TN (5: missing yes, FN)
               pope(6, "popular", "No")]                                       # TN: no positive at all
    result = score_yes_no(answers, annotations)
    assert result["adversarial/f1"] == pytest.approx(2 / 3) and result["adversarial/n"] == 2
    assert result["random/f1"] == pytest.approx(2 / 3) and result["random/n"] == 3  # the missing one counts
    assert result["popular/f1"] == 0.0 and result["popular/accuracy"] == 1.0
    assert result["f1_mean"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 1, 2, 1)  # pooled, as before
    assert "f1_mean" not in score_yes_no(answers[:2], {1: "yes", 2: "no"})  # one category: no split
    # A question with no answer (its image unreadable, say) counts in its question's category.
    annotations[5] = "yes"
    questions = [{"question_id": 5, "text": "q", "category": "random"}]
    assert score(answers, annotations, kind="yesno", questions=questions)["random/n"] == 3
    assert score(answers, annotations, kind="yesno")["random/n"] == 2
    # Categories are cleaned into names MLflow takes, apart.
    odd = score_yes_no([pope(1, "", "Yes"), pope(2, "..", "No"), pope(3, "a:b", "Yes"), pope(4, "a?b", "No")],
                       {1: "yes", 2: "no", 3: "yes", 4: "no"})
    assert {k.split("/")[0] for k in odd if "/" in k} == {"_", "__", "a_b", "a_b_"}


def test_exact_match_is_gqas_strict_comparison():
    annotations = {1: "man", 2: "black and white", 3: "yes", 4: "2"}
    answers = [answer(1, "The man"), answer(2, "Black and white."), answer(3, " yes"), answer(4, "two")]
    assert score(answers, annotations, kind="exact")["accuracy"] == pytest.approx(2 / 4)  # 2 and 3 right
    assert score(answers, annotations, kind="vqa")["accuracy"] > 0.5  # VQA's normalisation forgives 1 and 4


def test_find_missing():
    assert find_missing([answer(2, "x")], {1: "a", 2: "b", 3: "c"}) == [1, 3]


# --- loading -----------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_load_annotations(tmp_path):
    path = write_jsonl(tmp_path / "ann.jsonl", [
        {"question_id": 1, "answers": ["cat", "cat", "dog"], "kind": "vqa"},
        {"question_id": "b", "answer": "yes"},
        {"question_id": 3, "answers": [{"answer": "two"}, {"answer": "2"}]},  # VQAv2 style
    ])
    annotations = load_annotations(path)
    assert annotations[1] == Annotation(1, ("cat", "cat", "dog"), "vqa")
    assert annotations["b"] == Annotation("b", ("yes",), None)
    assert annotations[3].answers == ("two", "2")
    assert score_vqa([answer(3, "2")], {3: annotations[3]})["accuracy"] == pytest.approx(
        # both annotators say "2" after normalisation: each left out leaves 1 match -> 1/3
        1 / 3)


@pytest.mark.parametrize("records, message", [
    ([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}],
     "duplicate question_id=1"),
    ([{"answer": "a"}], "no question_id"),
    ([{"question_id": 5}], "question_id=5"),
    ([{"question_id": 6, "answers": []}], "question_id=6"),
    ([{"question_id": 7, "answer": "a", "kind": "bleu"}], "question_id=7"),
])
def test_load_annotations_errors(tmp_path, records, message):
    path = write_jsonl(tmp_path / "ann.jsonl", records)
    with pytest.raises(ValueError, match=message):
        load_annotations(path)


def test_load_annotations_bad_json_names_the_line(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text('{"question_id": 1, "answer": "a"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"ann\.jsonl:2"):
        load_annotations(path)


# --- ids that questions share (LLaVA's TextVQA and MME files) ------------------------------------


def test_questions_sharing_an_id_are_scored_by_their_text(tmp_path):
    # TextVQA in LLaVA's format: the image's id for each of its questions, the OCR tokens on the prompt's
    # second line; the annotation names the question (LLaVA's eval_textvqa.py matches image id + question).
    path = write_jsonl(tmp_path / "ann.jsonl", [
        {"question_id": "img1", "text": "What brand is this?", "answers": ["nike"] * 10},
        {"question_id": "img1", "text": "what year is it?", "answers": ["1999"] * 10},
        {"question_id": "img2", "answers": ["red"] * 10},
    ])
    annotations = load_annotations(path)
    assert annotations[("img1", "What brand is this?")].text == "What brand is this?"
    answers = [answer("img1", "1999", "what year is it?\nReference OCR token: 1999"),
               answer("img1", "adidas", "what brand is this?\nReference OCR token: nike"),
               answer("img2", "red", "What colour?")]
    result = score(answers, annotations, kind="vqa")
    assert (result["accuracy"], result["n"], result["missing"]) == (pytest.approx(2 / 3), 3, 0)
    # MME in LLaVA's format: the image file as the id, a yes and a no question, matched on the whole prompt
    mme = {("a/1.jpg", "Is it red? Please answer yes or no."): "yes",
           ("a/1.jpg", "Is it blue? Please answer yes or no."): "no"}
    mme_annotations = {key: Annotation(key[0], (label,), "yesno", key[1]) for key, label in mme.items()}
    replies = [answer("a/1.jpg", "Yes", "Is it red? Please answer yes or no."),
               answer("a/1.jpg", "Yes", "Is it blue? Please answer yes or no.")]
    assert score(replies, mme_annotations)["accuracy"] == pytest.approx(0.5)
    assert find_missing(replies[:1], mme_annotations) == ["a/1.jpg"]


def test_the_same_annotation_twice_is_one(tmp_path):
    line = {"question_id": "img1", "text": "What brand?", "answers": ["nike"]}
    annotations = load_annotations(write_jsonl(tmp_path / "ann.jsonl", [line, line, {"question_id": 2, "answer": "x"},
                                                                        {"question_id": 2, "answer": "x"}]))
    assert len(annotations) == 2


def test_a_shared_id_needs_each_questions_text(tmp_path):
    with pytest.raises(ValueError, match=r"ann\.jsonl:2: duplicate question_id='img1'"):
        load_annotations(write_jsonl(tmp_path / "ann.jsonl", [
            {"question_id": "img1", "text": "What brand?", "answer": "nike"},
            {"question_id": "img1", "answer": "1999"}]))
    with pytest.raises(ValueError, match=r"ann\.jsonl:2: duplicate question_id='img1'"):
        load_annotations(write_jsonl(tmp_path / "ann.jsonl", [
            {"question_id": "img1", "text": "What brand?", "answer": "nike"},
            {"question_id": "img1", "text": "what  BRAND?", "answer": "1999"}]))
    annotations = {("img1", "What brand?"): Annotation("img1", ("nike",), text="What brand?"),
                   ("img1", "What year?"): Annotation("img1", ("1999",), text="What year?")}
    with pytest.raises(ValueError, match="question_id='img1' \\(prompt 'What colour\\?'\\) has no annotation"):
        score([answer("img1", "red", "What colour?")], annotations, kind="vqa")
    with pytest.raises(ValueError, match="two answers for question_id='img1' and the question 'what year\\?'"):
        score([answer("img1", "1999", "What year?"), answer("img1", "1998", "what year?")], annotations, kind="vqa")
