"""An evaluation's question file: LLaVA's question JSONL read into questions (each with its line) and
the questions set aside, and the order answers and rejects are written in."""

from __future__ import annotations

import json
from typing import Any

from pipelines.evaluate.annotations import fold_text, iter_question_records
from pipelines.evaluate.inputs import LINE

MALFORMED = "malformed question"
DUPLICATE = "duplicate question"


def question_key(question_id: Any) -> tuple:
    """Sort key of question ids: integers in numeric order, then anything else by its string."""
    if isinstance(question_id, int) and not isinstance(question_id, bool):
        return (0, question_id, "")
    return (1, 0, str(question_id))


def record_key(record: dict) -> tuple:
    """Order of answer and reject records: by question_id (question_key), then by line."""
    line = record.get("metadata", {}).get("line", record.get("line", 0))
    return question_key(record["question_id"]), line



def parse_questions(data: bytes, where: str) -> tuple[list[dict], list[dict]]:
    """LLaVA question JSONL -> (questions, each with its line under LINE; rejects). A line without a
    question_id is an error (the file is not a question file); an id may repeat (LLaVA's TextVQA and
    MME files); a question without an image path or text is set aside as malformed, and one with the
    id and text of an earlier line (the same question twice: its answers could not be told apart) as
    a duplicate."""
    questions, rejects = [], []
    seen: dict[str, int] = {}
    for line, here, record in iter_question_records(data.decode("utf-8"), where, unique=False):
        qid = record["question_id"]
        image, text = record.get("image"), record.get("text")
        if not isinstance(image, str) or not image or not isinstance(text, str) or not text.strip():
            rejects.append({"question_id": qid, "line": line, "reason": MALFORMED,
                            "detail": f"{here}: needs an 'image' path and a 'text' string"})
            continue
        same = json.dumps([str(qid), fold_text(text)])
        if same in seen:
            rejects.append({"question_id": qid, "line": line, "reason": DUPLICATE,
                            "detail": f"{here}: the question_id and text of line {seen[same]}"})
            continue
        seen[same] = line
        questions.append({**record, LINE: line})
    return questions, rejects
