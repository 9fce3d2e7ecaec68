"""Benchmarks' own answer files as this project's annotations.jsonl (pipelines/evaluate/scoring.py), for
the question files LLaVA ships (llava/eval, scripts/v1_5/eval):

- TextVQA (`TextVQA_0.5.1_val.json`: {"data": [{image_id, question, answers, ...}]}): LLaVA's question
  file gives each question its image's id, so each annotation carries the question's text (LLaVA's
  eval_textvqa.py matches image id and lower-cased question the same way); scored "vqa" (ten answers).
  Where the file holds one (image, question) twice, the last wins, as in LLaVA's dictionary.
- GQA (`testdev_balanced_questions.json`: {question id: {question, answer, ...}}): one answer each,
  scored "exact" (GQA's strict match).
- POPE (`coco_pope_<category>.json`, a JSONL of {label, image?, ...} per category): LLaVA's
  eval_pope.py pairs a category's answers, in the question file's order, with its label file's lines
  in order; so do we, with LLaVA's question file (its ids and categories), checking the images where
  both name one; scored "yesno" per category.

Pure functions over parsed JSON; jobs/annotations.py reads and writes the files.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipelines.evaluate.annotations import fold_text

FORMATS = ("textvqa", "gqa", "pope")
POPE_PREFIX, POPE_SUFFIX = "coco_pope_", ".json"


def textvqa_annotations(document: Mapping[str, Any], where: str = "TextVQA") -> list[dict[str, Any]]:
    """TextVQA's annotation file -> annotations keyed by (image id, question)."""
    data = document.get("data") if isinstance(document, Mapping) else None
    if not isinstance(data, list):
        raise ValueError(f"{where}: not TextVQA's annotation file (no 'data' list)")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for i, entry in enumerate(data):
        try:
            image, question, answers = entry["image_id"], entry["question"], entry["answers"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: data[{i}] lacks image_id, question or answers ({e})") from e
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: data[{i}] ({image}): answers must be a list of strings")
        out[(str(image), fold_text(str(question)))] = {
            "question_id": image, "text": question, "answers": answers, "kind": "vqa"}
    return list(out.values())


def gqa_annotations(document: Mapping[str, Any], where: str = "GQA") -> list[dict[str, Any]]:
    """GQA's questions file (with answers: the balanced testdev split) -> one exact-match annotation each."""
    if not isinstance(document, Mapping) or not document:
        raise ValueError(f"{where}: not GQA's questions file (an object of question id -> question)")
    out = []
    for qid, entry in document.items():
        answer = entry.get("answer") if isinstance(entry, Mapping) else None
        if not isinstance(answer, str):
            raise ValueError(f"{where}: question {qid!r} has no answer (a split without answers cannot score)")
        out.append({"question_id": qid, "answer": answer, "kind": "exact"})
    return out


def pope_annotations(questions: Sequence[Mapping[str, Any]], label_files: Mapping[str, str],
                     where: str = "POPE") -> list[dict[str, Any]]:
    """POPE's label files ({file name: its text}) -> annotations of LLaVA's POPE questions (their
    records in file order: question_id, image, text, category), paired by order within a category."""
    by_category: dict[str, list[Mapping[str, Any]]] = {}
    for question in questions:
        by_category.setdefault(str(question.get("category")), []).append(question)
    out = []
    for name, text in sorted(label_files.items()):
        if not (name.startswith(POPE_PREFIX) and name.endswith(POPE_SUFFIX)):
            raise ValueError(f"{where}/{name}: not a POPE label file ({POPE_PREFIX}<category>{POPE_SUFFIX})")
        category = name[len(POPE_PREFIX):-len(POPE_SUFFIX)]
        labels = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    labels.append((lineno, json.loads(line)))
                except ValueError as e:
                    raise ValueError(f"{where}/{name}:{lineno}: not JSON ({e})") from e
        ours = by_category.get(category, [])
        if len(labels) != len(ours):
            raise ValueError(f"{where}/{name}: {len(labels)} labels, but the question file has {len(ours)} "
                             f"questions of category {category!r}")
        for question, (lineno, label) in zip(ours, labels):
            here = f"{where}/{name}:{lineno}"
            if not isinstance(label, Mapping) or label.get("label") not in ("yes", "no"):
                raise ValueError(f"{here}: needs a 'label' of 'yes' or 'no'")
            theirs, mine = label.get("image"), question.get("image")
            if theirs and mine and posixpath.basename(str(theirs)) != posixpath.basename(str(mine)):
                raise ValueError(f"{here}: image {theirs!r}, but question {question.get('question_id')!r} of that "
                                 f"place in the question file shows {mine!r}: not the same questions in order")
            out.append({"question_id": question["question_id"], "answer": label["label"], "kind": "yesno",
                        "category": category})
    return out


def convert(kind: str, document: Any, where: str) -> list[dict[str, Any]]:
    """The annotations of a benchmark's file of format `kind` (FORMATS)."""
    if kind == "textvqa":
        return textvqa_annotations(document, where)
    if kind == "gqa":
        return gqa_annotations(document, where)
    if kind == "pope":
        raise ValueError("POPE's labels are read with the question file: pope_annotations")
    raise ValueError(f"unknown annotation format {kind!r}; expected one of {FORMATS}")


def to_jsonl(annotations: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in annotations).encode("utf-8")
