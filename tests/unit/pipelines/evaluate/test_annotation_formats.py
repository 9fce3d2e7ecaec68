"""Benchmarks' answer files become annotations that score LLaVA's answers to LLaVA's question files."""

from __future__ import annotations

import json

import pytest

from pipelines.evaluate.annotation_formats import convert, pope_annotations, to_jsonl
from pipelines.evaluate.annotations import load_annotations
from pipelines.evaluate.scoring import score


def answer(qid, prompt, text):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


def test_textvqa_answers_are_matched_on_image_and_question(tmp_path):
    document = {"dataset_name": "textvqa", "data": [
        {"image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?", "question_id": 34602,
         "answers": ["dakota"] * 9 + ["dakota digital"]},
        {"image_id": "003a8ae2ef43b901", "question": "what does the small white text spell?", "question_id": 34603,
         "answers": ["copenhagen"] * 10},
        {"image_id": "00b0a4b4e0b0e1d6", "question": "what number is on the jersey?", "question_id": 34604,
         "answers": ["23"] * 10}]}
    path = tmp_path / "annotations.jsonl"
    path.write_bytes(to_jsonl(convert("textvqa", document, "TextVQA_0.5.1_val.json")))
    annotations = load_annotations(path)
    # LLaVA's question file: the image's id, the question, then the OCR tokens and the instruction
    suffix = "\nReference OCR token: Dakota, Digital\nAnswer the question using a single word or phrase."
    answers = [answer("003a8ae2ef43b901", "What is the brand of this camera?" + suffix, "Dakota"),
               answer("003a8ae2ef43b901", "What does the small white text spell?" + suffix, "London"),
               answer("00b0a4b4e0b0e1d6", "Reference OCR token: 23\nWhat number is on the jersey?", "23")]
    result = score(answers, annotations)
    assert result["n"] == 3 and result["missing"] == 0 and result["accuracy"] == pytest.approx(2 / 3)


def test_gqa_answers_are_matched_exactly():
    document = {"20968379": {"imageId": "n288870", "question": "Do the shorts have dark color?", "answer": "yes"},
                "20968380": {"imageId": "n288870", "question": "Who is wearing the shorts?", "answer": "man"}}
    annotations = {a["question_id"]: a for a in convert("gqa", document, "testdev_balanced_questions.json")}
    result = score([answer("20968379", "q", "Yes."), answer("20968380", "q", "The man")], annotations)
    assert result["accuracy"] == 0.5  # "the man" is not GQA's "man"


POPE_QUESTIONS = [  # LLaVA's llava_pope_test.jsonl: its own ids, the categories interleaved as they may be
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "category": "adversarial"},
    {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "category": "random"},
    {"question_id": 3, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a dining table in the image?",
     "category": "adversarial"}]


def pope_labels(*lines):
    return "".join(json.dumps(line) + "\n" for line in lines)


def test_pope_labels_pair_with_the_question_file_in_order_within_a_category():
    labels = {"coco_pope_adversarial.json": pope_labels(
                  {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "label": "yes"},
                  {"question_id": 2, "image": "COCO_val2014_000000210789.jpg", "label": "no"}),
              "coco_pope_random.json": pope_labels({"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                                                    "label": "no"})}
    annotations = pope_annotations(POPE_QUESTIONS, labels, "pope/coco")
    assert sorted((a["question_id"], a["answer"], a["category"]) for a in annotations) == [
        (1, "yes", "adversarial"), (2, "no", "random"), (3, "no", "adversarial")]
    answers = [{**answer(1, "q", "Yes"), "metadata": {"category": "adversarial"}},
               {**answer(2, "q", "Yes"), "metadata": {"category": "random"}},
               {**answer(3, "q", "No"), "metadata": {"category": "adversarial"}}]
    result = score(answers, {a["question_id"]: a for a in annotations})
    assert result["adversarial/f1"] == 1.0 and result["random/f1"] == 0.0 and result["f1_mean"] == 0.5


@pytest.mark.parametrize("labels, message", [
    ({"coco_pope_random.json": pope_labels({"label": "no"}, {"label": "yes"})}, "2 labels, but .* 1 questions"),
    ({"coco_pope_adversarial.json": pope_labels({"image": "COCO_val2014_000000999999.jpg", "label": "yes"},
                                                {"label": "no"})}, r"adversarial.json:1: image .* not the same"),
    ({"coco_pope_random.json": pope_labels({"label": "maybe"})}, r"random.json:1: needs a 'label'"),
    ({"coco_pope_random.json": "{broken\n"}, r"random.json:1: not JSON"),
    ({"pope_random.json": ""}, "not a POPE label file"),
])
def test_pope_labels_that_do_not_pair_are_refused_by_file_and_line(labels, message):
    with pytest.raises(ValueError, match=message):
        pope_annotations(POPE_QUESTIONS, labels, "pope/coco")


@pytest.mark.parametrize("kind, document, message", [
    ("textvqa", {"questions": []}, "no 'data' list"),
    ("textvqa", {"data": [{"image_id": "a", "question": "q"}]}, r"data\[0\] lacks"),
    ("textvqa", {"data": [{"image_id": "a", "question": "q", "answers": []}]}, "list of strings"),
    ("gqa", {"1": {"question": "q"}}, "question '1' has no answer"),
    ("gqa", [], "not GQA's questions file"),
    ("vqav2", {}, "unknown annotation format"),
])
def test_files_of_another_kind_are_refused_by_name(kind, document, message):
    with pytest.raises(ValueError, match=message):
        convert(kind, document, "file.json")


def test_the_job_writes_the_recipes_annotation_file(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("annotations_job",
                                                  Path(__file__).resolve().parents[4] / "jobs" / "annotations.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    source = tmp_path / "testdev_balanced_questions.json"
    source.write_text(json.dumps({"7": {"question": "q", "answer": "yes"}}))
    out = job.main(["--recipe", "tiny", "--from", "gqa", "--input", str(source), "--set", f"paths.root={tmp_path}"])
    assert out == str(tmp_path / "data" / "eval" / "annotations.jsonl")
    assert [json.loads(line) for line in Path(out).read_text().splitlines()] == [
        {"question_id": "7", "answer": "yes", "kind": "exact"}]
    source.write_text("{not json")
    with pytest.raises(SystemExit, match="testdev_balanced_questions.json: not JSON"):
        job.main(["--recipe", "tiny", "--from", "gqa", "--input", str(source), "--set", f"paths.root={tmp_path}"])
    # POPE: the label files of a folder, paired with the recipe's question file
    (tmp_path / "data" / "eval" / "questions.jsonl").write_text(pope_labels(*POPE_QUESTIONS))
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "coco_pope_random.json").write_text(pope_labels({"label": "yes"}))
    (tmp_path / "coco" / "coco_pope_adversarial.json").write_text(pope_labels({"label": "no"}, {"label": "yes"}))
    out = job.main(["--recipe", "tiny", "--from", "pope", "--input", str(tmp_path / "coco"),
                    "--set", f"paths.root={tmp_path}"])
    assert [json.loads(line)["answer"] for line in Path(out).read_text().splitlines()] == ["no", "yes", "yes"]
    with pytest.raises(SystemExit, match="no coco_pope_<category>.json label files"):
        job.main(["--recipe", "tiny", "--from", "pope", "--input", str(tmp_path / "data"),
                  "--set", f"paths.root={tmp_path}"])
