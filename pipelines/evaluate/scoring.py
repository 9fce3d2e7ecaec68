"""Scorers for LLaVA answer files: open-ended VQA, exact match (GQA), yes/no (POPE) and multiple choice
by letter.

Answers are LLaVA's `model_vqa*` records ({question_id, prompt, text, answer_id, model_id,
metadata}); `question_id`, `text` and (for repeated ids) `prompt` are read. Annotations map
question_id -> the reference answer(s). Question ids are matched by their string form, so 17 and "17"
are the same question.

Some of LLaVA's question files repeat ids: TextVQA's uses the image's id (several questions per
image), MME's the image's file (a "yes" and a "no" question each). Their annotations carry the
question's `text` too, and an answer is matched on (question_id, text) as LLaVA's scorers match them
(eval_textvqa.py: image id and question; MME: file and prompt): the text equals the answer's prompt,
or one of its lines, case aside (LLaVA's TextVQA prompts hold the question on one line, the OCR tokens
and the instruction on others). pipelines/evaluate/annotation_formats.py writes such annotations from
TextVQA's own file.

Conventions shared by every scorer:
- every annotated question counts in the denominator `n`; an annotated question with no answer is
  wrong and counted in `missing` (see `find_missing` for the ids);
- an answer whose question has no annotation, or two answers to one question, is an error: it means
  the answer file and the annotation file do not belong together;
- accuracies are fractions in [0, 1] (LLaVA's scripts print percentages).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.evaluate.answer_normalization import DEFAULT_LETTERS, parse_choice, parse_yes_no, vqa_accuracy

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


# ------------------------------------------------------------------------------------------------
# Annotations and answers
# ------------------------------------------------------------------------------------------------


def _key(question_id: Any) -> str:
    return str(question_id)


Ref = tuple[str, str | None]
"""How an annotation is found: (question_id as a string, its question's text folded, or None)."""


def fold_text(text: str) -> str:
    """A question's text as questions are told apart: whitespace runs as one space, case aside."""
    return " ".join(text.split()).casefold()


def _ref(ann: Annotation) -> Ref:
    return _key(ann.question_id), None if ann.text is None else fold_text(ann.text)


def _answer_refs(question_id: Any, prompt: Any) -> list[Ref]:
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
    """Read a JSONL file of {question_id, answers: [...] | answer: str, kind?, text?} into a mapping
    question_id -> Annotation ((question_id, text) -> Annotation for a record with the question's
    text). Blank lines are skipped; an id annotated twice is an error unless every record of it has
    its own text."""
    out: dict[Any, Annotation] = {}
    seen: dict[str, set[str | None]] = {}
    for _, where, record in iter_question_records(Path(path).read_text(encoding="utf-8"), str(path), unique=False):
        qid = record["question_id"]
        kind = record.get("kind")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"{where}: question_id={qid!r} has unknown kind {kind!r}")
        try:
            annotation = _as_annotation(qid, record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        key, text = _ref(annotation)
        texts = seen.setdefault(key, set())
        if text in texts and annotation in out.values():
            continue  # the same annotation again: one question, one reference
        if text in texts or (texts and (text is None or None in texts)):
            raise ValueError(f"{where}: duplicate question_id={qid!r} (an id annotated more than once needs "
                             "each question's 'text', all different)")
        texts.add(text)
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
        found = [ref for ref in _answer_refs(qid, record.get("prompt")) if ref in refs]
        if not found:
            raise ValueError(f"answer for question_id={qid!r} (prompt {str(record.get('prompt'))[:80]!r}) "
                             "has no annotation")
        if found[0] in replies:
            raise ValueError(f"two answers for question_id={qid!r}"
                             + ("" if found[0][1] is None else f" and the question {found[0][1][:80]!r}"))
        replies[found[0]] = text
    return replies


def _index_annotations(annotations: Mapping[Any, AnnotationLike]) -> dict[Ref, Annotation]:
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


def _join(answers: Iterable[Mapping[str, Any]], annotations: Mapping[Any, AnnotationLike]
          ) -> tuple[dict[Ref, Annotation], dict[Ref, str]]:
    refs = _index_annotations(annotations)
    return refs, _index_answers(answers, refs)


def find_missing(answers: Iterable[Mapping[str, Any]],
                 annotations: Mapping[Any, AnnotationLike]) -> list[Any]:
    """The annotated question ids that have no answer, in annotation order."""
    refs, replies = _join(answers, annotations)
    return [ann.question_id for key, ann in refs.items() if key not in replies]


# ------------------------------------------------------------------------------------------------
# Scorers
# ------------------------------------------------------------------------------------------------


def score_vqa(answers: Iterable[Mapping[str, Any]],
              annotations: Mapping[Any, AnnotationLike]) -> dict[str, float]:
    """Mean VQA accuracy (see `vqa_accuracy`) over the annotated questions."""
    refs, replies = _join(answers, annotations)
    total = sum(vqa_accuracy(replies[k], ann.answers) for k, ann in refs.items() if k in replies)
    return {"accuracy": total / len(refs), "n": len(refs), "answered": len(replies),
            "missing": len(refs) - len(replies)}


def exact_form(text: str) -> str:
    """A reply or reference as LLaVA's GQA scoring compares them (scripts/convert_gqa_for_eval.py:
    stripped, a trailing full stop dropped, lower-cased)."""
    return text.strip().rstrip(".").lower()


def score_exact(answers: Iterable[Mapping[str, Any]],
                annotations: Mapping[Any, AnnotationLike]) -> dict[str, float]:
    """Exact-match accuracy (GQA): a reply is right when its exact_form is a reference's, wrong otherwise
    (no article or number-word normalisation: "the man" is not "man", as in GQA's own scorer)."""
    refs, replies = _join(answers, annotations)
    correct = sum(exact_form(replies[k]) in {exact_form(a) for a in ann.answers} for k, ann in refs.items()
                  if k in replies)
    return {"accuracy": correct / len(refs), "n": len(refs), "answered": len(replies),
            "missing": len(refs) - len(replies)}


def _yes_no_label(ann: Annotation) -> str:
    label = ann.answers[0].strip().lower().rstrip(".")
    if len(ann.answers) != 1 or label not in ("yes", "no"):
        raise ValueError(f"question_id={ann.question_id!r}: a yes/no annotation must be one 'yes' "
                         f"or 'no', got {list(ann.answers)!r}")
    return label


def score_yes_no(answers: Iterable[Mapping[str, Any]], annotations: Mapping[Any, AnnotationLike],
                 questions: Iterable[Mapping[str, Any]] = ()) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class: accuracy, precision, recall, F1, yes-ratio.

    A missing answer is wrong: it lowers accuracy (denominator n) and, for a "yes" question, counts
    as a false negative; it predicts nothing, so it is in neither precision nor the yes-ratio
    (which is over the answered questions, as in LLaVA).

    Where the answers name several categories (metadata.category: POPE's adversarial, popular and
    random), each category's metrics too ("<category>/f1", ...) and `f1_mean`, their mean F1: POPE's
    figure as LLaVA's eval_pope.py gives it, per category, and papers average them. A missing answer
    counts in its annotation's `category`, or its question's (questions: the question file's records,
    {question_id, text, category}); an answered one, failing both, in its answer's.
    """
    answers = list(answers)
    refs, replies = _join(answers, annotations)
    category_of = {ref: ann.category for ref, ann in refs.items() if ann.category is not None}
    for question in questions:
        found = [r for r in _answer_refs(question["question_id"], question.get("text")) if r in refs]
        if question.get("category") is not None and found and found[0] not in category_of:
            category_of[found[0]] = str(question["category"])
    for record in answers:
        category = (record.get("metadata") or {}).get("category")
        ref = next(r for r in _answer_refs(record["question_id"], record.get("prompt")) if r in refs)
        if category is not None and ref not in category_of:
            category_of[ref] = str(category)
    labelled = [(ref, _yes_no_label(ann)) for ref, ann in refs.items()]
    metrics = _yes_no_metrics([(label, replies.get(ref)) for ref, label in labelled])
    categories = sorted(set(category_of.values()))
    if len(categories) > 1:
        f1s = []
        for category in categories:
            part = _yes_no_metrics([(label, replies.get(ref)) for ref, label in labelled
                                    if category_of.get(ref) == category])
            name = re.sub(r"[^\w.\- ]", "_", category)  # a metric name MLflow takes
            name = name if name.strip(". ") else "_"
            while f"{name}/n" in metrics:  # two categories that read the same once cleaned
                name += "_"
            metrics.update({f"{name}/{k}": v for k, v in part.items()
                            if k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")})
            f1s.append(part["f1"])
        metrics["f1_mean"] = sum(f1s) / len(f1s)
    return metrics


def _yes_no_metrics(pairs: Sequence[tuple[str, str | None]]) -> dict[str, float]:
    """(label, reply or None when missing) pairs -> POPE's metrics (score_yes_no)."""
    tp = fp = tn = fn = 0
    for label, reply in pairs:
        if reply is None:
            fn += label == "yes"
            continue
        pred = parse_yes_no(reply)
        if pred == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    n, answered = len(pairs), sum(reply is not None for _, reply in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / answered if answered else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "n": n, "answered": answered, "missing": n - answered}


def _choice_label(ann: Annotation, letters: str) -> str:
    label = ann.answers[0].strip() if len(ann.answers) == 1 else ""
    if len(label) != 1 or label not in letters:
        raise ValueError(f"question_id={ann.question_id!r}: a choice annotation must be one letter "
                         f"of {letters!r}, got {list(ann.answers)!r}")
    return label


def score_choice(answers: Iterable[Mapping[str, Any]],
                 annotations: Mapping[Any, AnnotationLike],
                 letters: str = DEFAULT_LETTERS) -> dict[str, float]:
    """Multiple-choice accuracy by option letter (see `parse_choice`); unreadable replies are wrong
    and counted in `unparsed`."""
    refs, replies = _join(answers, annotations)
    correct = unparsed = 0
    for key, ann in refs.items():
        label = _choice_label(ann, letters)
        if key not in replies:
            continue
        pred = parse_choice(replies[key], letters)
        unparsed += pred is None
        correct += pred == label
    n, answered = len(refs), len(replies)
    return {"accuracy": correct / n, "n": n, "answered": answered, "missing": n - answered,
            "unparsed": unparsed}


def _resolve_kind(refs: dict[Ref, Annotation], kind: str | None) -> str:
    declared = {ann.kind for ann in refs.values() if ann.kind is not None}
    if kind is None:
        if len(declared) != 1:
            raise ValueError(f"pass kind= (one of {KINDS}); the annotations declare "
                             f"{sorted(declared)}")
        kind = declared.pop()
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    for ann in refs.values():
        if ann.kind is not None and ann.kind != kind:
            raise ValueError(f"question_id={ann.question_id!r} is annotated as {ann.kind!r}, "
                             f"scored as {kind!r}")
    return kind


def score(answers: Iterable[Mapping[str, Any]], annotations: Mapping[Any, AnnotationLike],
          kind: Kind | None = None, letters: str = DEFAULT_LETTERS,
          questions: Iterable[Mapping[str, Any]] = ()) -> dict[str, float]:
    """Score answers against annotations with the scorer for `kind` ("vqa", "exact", "yesno", "choice"; None
    takes the single kind the annotations declare). Returns metrics plus counts n, answered,
    missing (and unparsed for "choice"). questions: the question file's records, whose categories
    score_yes_no splits POPE by."""
    answers = list(answers)
    resolved = _resolve_kind(_index_annotations(annotations), kind)
    if resolved == "vqa":
        return score_vqa(answers, annotations)
    if resolved == "exact":
        return score_exact(answers, annotations)
    if resolved == "yesno":
        return score_yes_no(answers, annotations, questions)
    return score_choice(answers, annotations, letters)
