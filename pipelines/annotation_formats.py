"""Benchmarks' own answer files as this project's annotations.jsonl (pipelines/answer_scoring.py), for
the question files LLaVA ships (llava/eval, scripts/v1_5/eval):

- TextVQA (`TextVQA_0.5.1_val.json`: {"data": [{image_id, question, answers, ...}]}): LLaVA's question
  file gives each question its image's id, so each annotation carries the question's text (LLaVA's
  eval_textvqa.py matches image id and lower-cased question the same way); scored "vqa" (ten answers).
  Where the file holds one (image, question) twice, the last wins, as in LLaVA's dictionary.
- GQA (`testdev_balanced_questions.json`: {question id: {question, answer, ...}}): one answer each,
  scored "exact" (GQA's strict match).

Pure functions over parsed JSON; jobs/annotations.py reads and writes the files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

FORMATS = ("textvqa", "gqa")


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
        out[(str(image), " ".join(str(question).split()).casefold())] = {
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


def convert(kind: str, document: Any, where: str) -> list[dict[str, Any]]:
    """The annotations of a benchmark's file of format `kind` (FORMATS)."""
    if kind == "textvqa":
        return textvqa_annotations(document, where)
    if kind == "gqa":
        return gqa_annotations(document, where)
    raise ValueError(f"unknown annotation format {kind!r}; expected one of {FORMATS}")


def to_jsonl(annotations: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in annotations).encode("utf-8")
