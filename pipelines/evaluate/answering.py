"""Answering an evaluation's questions: which TRIM settings (by name), the pure core that answers
prepared rows in batches sorted by prompt length, and the Ray Data actor around it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.evaluate.inputs import LINE, PREPARED_COLUMNS, inputs_of, pixels_of
from trim import TrimConfig

ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
GENERATIONS = ("auto", "low_latency", "eager")


def answer_id(question_id: Any, model_id: str, line: int | None = None) -> str:
    """A deterministic 22-character id (the length of LLaVA's shortuuid) of (model, question[, line])."""
    digest = hashlib.sha256(json.dumps([model_id, question_id] + ([] if line is None else [line])).encode())
    return digest.hexdigest()[:22]


_PRESET_FIELDS = ("similarity", "keep", "threshold", "iqr_scope", "iqr_multiplier", "aggregate")


def trim_name(cfg: TrimConfig) -> str:
    """A short name of a TRIM config: its preset ("default", "paper", "official", "ratio:0.05") or
    "custom", with "/<selection>" when the selection is a baseline ("default/all": no reduction)."""
    def same(preset: TrimConfig) -> bool:
        fields = _PRESET_FIELDS + (("ratio",) if preset.threshold == "ratio" else ())
        return all(getattr(cfg, f) == getattr(preset, f) for f in fields)

    name = "custom"
    if cfg.threshold == "ratio" and same(TrimConfig.fixed_ratio(cfg.ratio)):
        name = f"ratio:{cfg.ratio:g}"
    else:
        for preset in ("default", "paper", "official"):
            if same(TrimConfig.preset(preset)):
                name = preset
                break
    return name if cfg.selection == "trim" else f"{name}/{cfg.selection}"


def resolve_trim(spec: str, recipe_trim: TrimConfig, model_trim: dict | None) -> TrimConfig:
    """The TRIM config to evaluate with: "model" (the one the model was trained with, as its
    directory records; the recipe's if it records none), "recipe", "full" (the model's config with
    every patch kept: the no-TRIM baseline), or a preset name ("default", "paper", "official",
    "ratio:<float>"), which keeps the model's text settings."""
    model_cfg = TrimConfig.from_dict(model_trim) if model_trim else recipe_trim
    if spec == "model":
        return model_cfg
    if spec == "recipe":
        return recipe_trim
    if spec == "full":
        return dataclasses.replace(model_cfg, selection="all")
    return TrimConfig.preset(spec, text=model_cfg.text, text_at_inference=model_cfg.text_at_inference)


def answer_record(question: dict, answer, model_id: str, trim_label: str) -> dict:
    """One line of LLaVA's answer file; metadata adds what TRIM did."""
    line = question.get(LINE)
    metadata = {"visual_tokens": answer.num_visual_tokens, "kept": answer.num_kept, "trim": trim_label}
    if line is not None:
        metadata["line"] = line
    if "category" in question:
        metadata["category"] = question["category"]
    return {"question_id": question["question_id"], "prompt": question["text"], "text": answer.text,
            "answer_id": answer_id(question["question_id"], model_id, line), "model_id": model_id,
            "metadata": metadata}


def answer_questions(answerer, rows: Sequence[dict], max_new_tokens: int, model_id: str, batch_size: int,
                     picture_lines: Iterable[int] = (), low_latency: bool = False, sort_window: int = 1) -> list[dict]:
    """The pure core: prepared rows (pipelines.evaluate.inputs: questions with their 8-bit pixels and
    token ids, and rejects) -> output rows {kind: "answer" | "reject", record, kept, scores, started, ended}, rejects
    passed on. kept (JSON list) and scores (fp16 bytes) are filled only for the questions of the lines
    in picture_lines; started/ended (epoch seconds) bound the answer call of the row's batch (0 on
    rejects). Questions are answered batch_size at a time, the batches of each sort_window x batch_size
    questions formed in order of prompt length (Answerer.answer_prepared); low_latency: through
    trim.low_latency."""
    pictures = set(picture_lines)
    label = trim_name(answerer.trim_cfg)
    out = [{"kind": "reject", "record": r["record"], "kept": "[]", "scores": b"", "started": 0.0, "ended": 0.0}
           for r in rows if r["kind"] == "reject"]
    prepared = [r for r in rows if r["kind"] == "question"]
    if batch_size < 1 or sort_window < 1:
        raise ValueError(f"batch_size={batch_size}, sort_window={sort_window}: both must be >= 1")
    window = batch_size * sort_window
    for start in range(0, len(prepared), window):
        chunk = prepared[start:start + window]
        questions = [json.loads(r["record"]) for r in chunk]
        began = time.time()
        answers = answerer.answer_prepared(pixels_of(chunk), [q["text"] for q in questions], max_new_tokens,
                                           low_latency=low_latency, inputs=inputs_of(chunk), batch_size=batch_size)
        ended = time.time()
        for question, answer in zip(questions, answers):
            wanted = question.get(LINE) in pictures
            out.append({"kind": "answer", "record": json.dumps(answer_record(question, answer, model_id, label)),
                        "kept": json.dumps(answer.kept_indices if wanted else []),
                        "scores": answer.scores.astype(np.float16).tobytes() if wanted else b"",
                        "started": began, "ended": ended})
    return out


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time some actor spent answering, actors
    answering at the same time counted once."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(set(intervals)):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


class EvalActor:
    """Ray Data actor: loads the model and the CLIP towers once, answers batches of prepared questions."""

    def __init__(self, model_dir: str, clip_path: str, trim_cfg: dict, max_new_tokens: int, model_id: str,
                 batch_size: int, picture_lines: list[int], generation: str = "auto", sort_window: int = 1):
        import torch

        from trim.inference import Answerer

        device = "cuda" if torch.cuda.is_available() else "cpu"  # bf16 there (fp16 without bf16), fp32 on CPU
        local_model, local_clip = storage.local_copy(model_dir), storage.local_copy(clip_path)
        self.answerer = Answerer.load(local_model, local_clip, TrimConfig.from_dict(trim_cfg), device=device)
        for local, uri in ((local_model, model_dir), (local_clip, clip_path)):
            if local != uri:  # a temporary copy of an S3 directory: the weights are in memory now
                shutil.rmtree(local, ignore_errors=True)
        self.max_new_tokens, self.model_id = max_new_tokens, model_id
        self.batch_size, self.picture_lines, self.sort_window = batch_size, picture_lines, sort_window
        if generation not in GENERATIONS:
            raise ValueError(f"eval.generation={generation!r}: expected one of {GENERATIONS}")
        self.low_latency = generation == "low_latency" or (generation == "auto" and device == "cuda")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [dict(zip(PREPARED_COLUMNS, values)) for values in zip(*(batch[name] for name in PREPARED_COLUMNS))]
        out = answer_questions(self.answerer, rows, self.max_new_tokens, self.model_id, self.batch_size,
                               self.picture_lines, self.low_latency, self.sort_window)
        return {name: [r[name] for r in out] for name in ("kind", "record", "kept", "scores", "started", "ended")}
