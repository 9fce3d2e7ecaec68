"""Scorers for LLaVA answer files: open-ended VQA, exact match (GQA), yes/no (POPE) and multiple choice
by letter.

Answers are LLaVA's `model_vqa*` records ({question_id, prompt, text, answer_id, model_id,
metadata}); `question_id`, `text` and (for repeated ids) `prompt` are read, and matched to their
annotations as pipelines/evaluate/annotations.py says. Conventions shared by every scorer:
- every annotated question counts in the denominator `n`; an annotated question with no answer is
  wrong and counted in `missing` (see `find_missing` for the ids);
- accuracies are fractions in [0, 1] (LLaVA's scripts print percentages).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipelines.evaluate.annotations import (
    KINDS,
    Annotation,
    AnnotationLike,
    Kind,
    Ref,
    answer_refs,
    index_annotations,
    join_answers,
)
from pipelines.evaluate.answer_normalization import DEFAULT_LETTERS, parse_choice, parse_yes_no, vqa_accuracy


def score_vqa(answers: Iterable[Mapping[str, Any]],
              annotations: Mapping[Any, AnnotationLike]) -> dict[str, float]:
    """Mean VQA accuracy (see `vqa_accuracy`) over the annotated questions."""
    refs, replies = join_answers(answers, annotations)
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
    refs, replies = join_answers(answers, annotations)
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
    refs, replies = join_answers(answers, annotations)
    category_of = {ref: ann.category for ref, ann in refs.items() if ann.category is not None}
    for question in questions:
        found = [r for r in answer_refs(question["question_id"], question.get("text")) if r in refs]
        if question.get("category") is not None and found and found[0] not in category_of:
            category_of[found[0]] = str(question["category"])
    for record in answers:
        category = (record.get("metadata") or {}).get("category")
        ref = next(r for r in answer_refs(record["question_id"], record.get("prompt")) if r in refs)
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
    refs, replies = join_answers(answers, annotations)
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
    resolved = _resolve_kind(index_annotations(annotations), kind)
    if resolved == "vqa":
        return score_vqa(answers, annotations)
    if resolved == "exact":
        return score_exact(answers, annotations)
    if resolved == "yesno":
        return score_yes_no(answers, annotations, questions)
    return score_choice(answers, annotations, letters)
