"""Annotations and answers for scoring: reading annotation and answer files keyed by question_id,
and matching each answer to the annotation it answers.

Question ids are matched by their string form, so 17 and "17" are the same question. Some of LLaVA's
question files repeat ids: TextVQA's uses the image's id (several questions per image), MME's the
image's file (a "yes" and a "no" question each). Their annotations carry the question's `text` too,
and an answer is matched on (question_id, text) as LLaVA's scorers match them (eval_textvqa.py: image
id and question; MME: file and prompt): the text equals the answer's prompt, or one of its lines, case
aside (LLaVA's TextVQA prompts hold the question on one line, the OCR tokens and the instruction on
others). pipelines/evaluate/annotation_formats.py writes such annotations from TextVQA's own file.
An answer whose question has no annotation, or two answers to one question, is an error: the answer
file and the annotation file do not belong together.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["vqa", "exact", "yesno", "choice"]
KINDS: tuple[str, ...] = ("vqa", "exact", "yesno", "choice")


@dataclass(frozen=True)
class Annotation:
    """The reference for one question: one or several answers, and optionally its kind."""

    question_id: Any
    answers: tuple[str, ...]
    kind: str | None = None
    text: str | None = None
    """The question's text, for ids that several questions share (module doc); None: the id alone."""
    category: str | None = None
    """The question's category (POPE: adversarial, popular, random), scored apart by score_yes_no."""


AnnotationLike = Annotation | Mapping[str, Any] | str | Sequence[str]


def _key(question_id: Any) -> str:
    return str(question_id)


Ref = tuple[str, str | None]
"""How an annotation is found: (question_id as a string, its question's text folded, or None)."""


def fold_text(text: str) -> str:
    """A question's text as questions are told apart: whitespace runs as one space, case aside."""
    return " ".join(text.split()).casefold()


def _ref(ann: Annotation) -> Ref:
    return _key(ann.question_id), None if ann.text is None else fold_text(ann.text)


def answer_refs(question_id: Any, prompt: Any) -> list[Ref]:
    """The annotations an answer may belong to, most specific first: (id, whole prompt), (id, each line
    of the prompt: LLaVA's prompts put the question on one line, OCR tokens and instructions on others),
    (id)."""
    refs: list[Ref] = []
    if isinstance(prompt, str) and prompt.strip():
        refs += [(_key(question_id), fold_text(prompt))]
        refs += [(_key(question_id), fold_text(line)) for line in prompt.splitlines() if line.strip()]
    return refs + [(_key(question_id), None)]


def _answers_of(raw: Any, where: str) -> tuple[str, ...]:
    # VQAv2 stores answers as [{"answer": ...}, ...]; our JSONL uses plain strings. Accept both.
    items = [raw] if isinstance(raw, str) else list(raw)
    out = []
    for item in items:
        value = item.get("answer") if isinstance(item, Mapping) else item
        if not isinstance(value, str):
            raise ValueError(f"{where}: answers must be strings, got {value!r}")
        out.append(value)
    if not out:
        raise ValueError(f"{where}: no reference answer")
    return tuple(out)


def _as_annotation(question_id: Any, value: AnnotationLike) -> Annotation:
    where = f"annotation for question_id={question_id!r}"
    if isinstance(value, Annotation):
        return value
    if isinstance(value, Mapping):
        if "answers" in value:
            answers = _answers_of(value["answers"], where)
        elif "answer" in value:
            answers = _answers_of(value["answer"], where)
        else:
            raise ValueError(f"{where}: needs 'answers' or 'answer'")
        text = value.get("text")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ValueError(f"{where}: 'text' must be the question's text, got {text!r}")
        category = value.get("category")
        return Annotation(question_id, answers, value.get("kind"), text, None if category is None else str(category))
    return Annotation(question_id, _answers_of(value, where))


def iter_question_records(text: str, where: str, unique: bool = True) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, where:line, record) for each line of a JSONL file keyed by question_id (question,
    answer and annotation files alike). Blank lines are skipped; a line that is not a JSON object with
    a question_id is an error naming the file and line, and so is a repeated id when `unique`."""
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        here = f"{where}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{here}: not JSON ({e.msg})") from e
        if not isinstance(record, dict) or "question_id" not in record:
            raise ValueError(f"{here}: record has no question_id")
        qid = record["question_id"]
        if unique and _key(qid) in seen:
            raise ValueError(f"{here}: duplicate question_id={qid!r}")
        seen.add(_key(qid))
        yield lineno, here, record


def load_annotations(path: str | Path) -> dict[Any, Annotation]:
    """`read_annotations` of a local file."""
    return read_annotations(Path(path).read_text(encoding="utf-8"), str(path))


def read_annotations(text: str, source: str) -> dict[Any, Annotation]:
    """Read JSONL lines of {question_id, answers: [...] | answer: str, kind?, text?} into a mapping
    question_id -> Annotation ((question_id, text) -> Annotation for a record with the question's
    text); errors name `source` (the file as the user gave it) and the line. Blank lines are skipped;
    an id annotated twice is an error unless every record of it has its own text."""
    out: dict[Any, Annotation] = {}
    seen: dict[str, set[str | None]] = {}
    for _, where, record in iter_question_records(text, source, unique=False):
        qid = record["question_id"]
        kind = record.get("kind")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"{where}: question_id={qid!r} has unknown kind {kind!r}")
        try:
            annotation = _as_annotation(qid, record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        key, folded = _ref(annotation)
        texts = seen.setdefault(key, set())
        if folded in texts and annotation in out.values():
            continue  # the same annotation again: one question, one reference
        if folded in texts or (texts and (folded is None or None in texts)):
            raise ValueError(f"{where}: duplicate question_id={qid!r} (an id annotated more than once needs "
                             "each question's 'text', all different)")
        texts.add(folded)
        out[qid if annotation.text is None else (qid, annotation.text)] = annotation
    return out


def load_answers(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA answers JSONL file (one record per line; blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _index_answers(answers: Iterable[Mapping[str, Any]], refs: Mapping[Ref, Annotation]) -> dict[Ref, str]:
    """Each answer's text under the annotation it answers (see `_answer_refs`)."""
    replies: dict[Ref, str] = {}
    for i, record in enumerate(answers):
        if "question_id" not in record:
            raise ValueError(f"answer record #{i} has no question_id")
        qid = record["question_id"]
        text = record.get("text")
        if not isinstance(text, str):
            raise ValueError(f"answer for question_id={qid!r} has no 'text' string")
        found = [ref for ref in answer_refs(qid, record.get("prompt")) if ref in refs]
        if not found:
            raise ValueError(f"answer for question_id={qid!r} (prompt {str(record.get('prompt'))[:80]!r}) "
                             "has no annotation")
        if found[0] in replies:
            raise ValueError(f"two answers for question_id={qid!r}"
                             + ("" if found[0][1] is None else f" and the question {found[0][1][:80]!r}"))
        replies[found[0]] = text
    return replies


def index_annotations(annotations: Mapping[Any, AnnotationLike]) -> dict[Ref, Annotation]:
    out: dict[Ref, Annotation] = {}
    for qid, value in annotations.items():
        annotation = _as_annotation(qid, value)
        ref = _ref(annotation)
        if ref in out:
            raise ValueError(f"question_id={annotation.question_id!r} is annotated twice"
                             + ("" if ref[1] is None else f" for the question {annotation.text!r}"))
        out[ref] = annotation
    if not out:
        raise ValueError("no annotations to score against")
    return out


def join_answers(answers: Iterable[Mapping[str, Any]], annotations: Mapping[Any, AnnotationLike]
          ) -> tuple[dict[Ref, Annotation], dict[Ref, str]]:
    refs = index_annotations(annotations)
    return refs, _index_answers(answers, refs)


def find_missing(answers: Iterable[Mapping[str, Any]],
                 annotations: Mapping[Any, AnnotationLike]) -> list[Any]:
    """The annotated question ids that have no answer, in annotation order."""
    refs, replies = join_answers(answers, annotations)
    return [ann.question_id for key, ann in refs.items() if key not in replies]


# ------------------------------------------------------------------------------------------------
# Scorers
# ------------------------------------------------------------------------------------------------
