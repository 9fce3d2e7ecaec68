"""Stage 4, evaluate: online CLIP + TRIM + generation over a LLaVA evaluation split, then scores.

Input: LLaVA's question file (JSONL: question_id, image, text, category?) and its image folder (local
or s3://). Output, in this evaluation's own folder `eval/<run>-<trim>-<hash12>/` (the hash is of
everything that changes the answers: pipelines/evaluate/outputs.py):
  answers.jsonl   LLaVA's answer-file format, one line per answered question, sorted by question_id
                  (then by line): {question_id, prompt, text, answer_id, model_id, metadata}; metadata
                  holds the question's line in the question file (ids may repeat: TextVQA's and MME's
                  files in LLaVA's format share an id among an image's questions)
  rejects.jsonl   questions set aside (missing or unreadable image, malformed line): question_id,
                  line, reason, detail; scored as missing
  manifest.json   what produced the answers (model files, TRIM config, generation settings, questions)
                  and the counts and metrics; written last

A Ray Data pipeline runs the questions: CPU tasks fetch each batch's images in one storage call,
decode, pad and resize them (pipelines/evaluate/inputs.py); an actor pool answers: each actor loads the
model and the CLIP towers once (on its GPU in bf16 when the cluster has GPUs, else on the CPU in
fp32) and answers a batch with one CLIP forward, one TRIM call and one batched generation (on CUDA
through trim.low_latency's static cache and CUDA graphs), its generation batches formed in order of
prompt length among eval.sort_window of them (TRIM's counts vary by image). The
driver writes the files, scores them when an annotation file exists, and logs metrics (throughput
`questions_per_s` = answers / seconds some actor spent answering), the answers and a few TRIM
pictures to MLflow. Run again with the same inputs: inference is skipped, scores and logs are redone;
with another model, TRIM setting, question file or generation setting the answers go to another
folder, and a run that failed before its manifest leaves answers that nothing reuses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping

import numpy as np

from pipelines import storage
from pipelines.config import Recipe
from pipelines.evaluate import outputs as eval_outputs
from pipelines.evaluate.answering import GENERATIONS, EvalActor, busy_seconds, resolve_trim, trim_name
from pipelines.evaluate.inputs import LINE, prepare_batch
from pipelines.evaluate.questions import parse_questions, question_key, record_key
from pipelines.manifests import EvalManifest
from pipelines.tracking import Tracker
from pipelines.tracking_store import default_tracking_uri, experiment_name
from trim import TrimConfig
from trim.model_files import SETTINGS_FILE

logger = logging.getLogger(__name__)

def picture_stem(question: dict, shared: Mapping[str, int]) -> str:
    """A question's picture name: question-<id>, or question-<id>-line<line> for an id several questions
    share (shared: how many questions hold each id, as a string)."""
    qid = str(question["question_id"])
    return f"question-{qid}" if shared.get(qid, 1) == 1 else f"question-{qid}-line{question[LINE]}"


def _jsonl(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _score(answers: list[dict], annotations_uri: str, kind: str, questions: list[dict]) -> dict[str, float]:
    """Score against the annotation file; its errors name the file as the recipe gives it."""
    from pipelines.evaluate.annotations import read_annotations
    from pipelines.evaluate.scoring import score

    text = storage.read_bytes(annotations_uri).decode("utf-8", errors="replace")
    return score(answers, read_annotations(text, annotations_uri), kind=kind, questions=questions)  # type: ignore[arg-type]


def _infer(questions: list[dict], model_dir: str, trim_cfg: TrimConfig, recipe, picture_lines: list[int], gpus: int
           ) -> tuple[list[dict], list[dict], dict[int, tuple[list[int], np.ndarray]], float]:
    """The Ray Data job, gpus (0 or 1) per actor: (answers, rejects, {question line: (kept, scores)}
    for the pictures, seconds some actor spent answering)."""
    import ray

    cfg, paths = recipe.eval, recipe.paths
    answers: list[dict] = []
    rejects: list[dict] = []
    pictures: dict[int, tuple[list[int], np.ndarray]] = {}
    if not questions:
        return answers, rejects, pictures, 0.0
    logger.info("inference actors on %s", "one GPU each" if gpus else "CPUs")
    intervals = []
    # CPU tasks fetch, decode and resize each batch's images; the actors only answer.
    prepared = ray.data.from_items([{"question": json.dumps(q)} for q in questions]).map_batches(
        prepare_batch, batch_size=cfg.batch_size,  # type: ignore[arg-type]
        fn_kwargs={"clip_path": paths.clip, "model_dir": model_dir, "text_mode": trim_cfg.text_at_inference,
                   "image_root": paths.eval_images}, batch_format="default")
    dataset = prepared.map_batches(  # an actor gets sort_window generation batches at a time, to sort by length
        EvalActor, batch_size=cfg.batch_size * cfg.sort_window,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_gpus=gpus,
        fn_constructor_kwargs=dict(model_dir=model_dir, clip_path=paths.clip, trim_cfg=trim_cfg.to_dict(),
                                   max_new_tokens=cfg.max_new_tokens, model_id=recipe.train.run_name,
                                   batch_size=cfg.batch_size, picture_lines=picture_lines, generation=cfg.generation,
                                   sort_window=cfg.sort_window),
        batch_format="default")
    for row in dataset.iter_rows():
        record = json.loads(row["record"])
        (answers if row["kind"] == "answer" else rejects).append(record)
        if row["kind"] == "answer":
            intervals.append((float(row["started"]), float(row["ended"])))
        if row["scores"]:
            scores = np.frombuffer(row["scores"], dtype=np.float16).astype(np.float32)
            pictures[record["metadata"]["line"]] = (json.loads(row["kept"]), scores)
    return answers, rejects, pictures, busy_seconds(intervals)


def _log_run(tracker, params: dict, metrics: dict, files: list[str], pictures_uri: str) -> int:
    """Params, metrics, the answer files and the pictures into an MLflow run; returns the picture count."""
    from pipelines.pictures import log_pictures

    tracker.log_params(params)
    tracker.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory() as directory:
        def fetch(uri: str) -> str:
            local = os.path.join(directory, os.path.basename(uri))
            with open(local, "wb") as f:
                f.write(storage.read_bytes(uri))
            return local

        for uri in files:
            tracker.log_artifact(fetch(uri))
        pictures = [fetch(storage.join(pictures_uri, name)) for name in storage.listdir(pictures_uri, ".png")]
        log_pictures(tracker, pictures)
    return len(pictures)


def _accelerator() -> str:
    """The device kind the actors answer on: one GPU each where the cluster has GPUs (Ray hides them
    from actors that ask for none), else CPUs."""
    import ray

    return "GPU" if ray.cluster_resources().get("GPU", 0) >= 1 else "CPU"


def run_evaluate(recipe: Recipe, model_dir: str, trim_spec: str = "model",
                 tracking_uri: str | None = None) -> EvalManifest:
    """Answer, write, score and log an evaluation split into this evaluation's own folder
    (pipelines.evaluate.outputs); returns the manifest (with "metrics")."""
    started = time.time()
    paths, cfg = recipe.paths, recipe.eval
    if cfg.generation not in GENERATIONS:
        raise ValueError(f"eval.generation={cfg.generation!r}: expected one of {GENERATIONS}")
    if cfg.batch_size < 1 or cfg.sort_window < 1:
        raise ValueError(f"eval.batch_size={cfg.batch_size}, eval.sort_window={cfg.sort_window}: both must be >= 1")
    model_id = recipe.train.run_name
    settings = storage.read_json(storage.join(model_dir, SETTINGS_FILE))
    trim_cfg = resolve_trim(trim_spec, recipe.trim, settings.get("trim"))
    label = trim_name(trim_cfg)
    question_bytes = storage.read_bytes(paths.eval_questions)
    questions, malformed = parse_questions(question_bytes, paths.eval_questions)
    accelerator = _accelerator()
    identity = eval_outputs.identity(recipe, model_dir, trim_cfg, question_bytes, accelerator)
    out_dir = eval_outputs.output_dir(paths.eval_dir, model_id, label, identity)
    answers_uri, rejects_uri, pictures_uri = (storage.join(out_dir, name) for name in (
        eval_outputs.ANSWERS_FILE, eval_outputs.REJECTS_FILE, eval_outputs.PICTURES_DIR))

    previous = eval_outputs.stored(out_dir, identity)
    if previous:
        logger.info("%s already holds these answers; scoring and logging only", out_dir)
        answers, rejects = _read_jsonl(previous.answers), _read_jsonl(previous.rejects_file)
        seconds, answering_s = previous.metrics.get("seconds", 0.0), previous.metrics.get("inference_s", 0.0)
    else:
        eval_outputs.forget(out_dir)
        logger.info("%d questions (%d malformed) with TRIM %s on %s, %d actor(s), batches of %d (sorted by length "
                    "in windows of %d) -> %s", len(questions), len(malformed), label, accelerator, cfg.concurrency,
                    cfg.batch_size, cfg.sort_window, out_dir)
        ordered = sorted(questions, key=lambda q: (question_key(q["question_id"]), q[LINE]))
        picture_lines = [q[LINE] for q in ordered[:cfg.num_pictures]]
        answers, rejects, picture_rows, answering_s = _infer(questions, model_dir, trim_cfg, recipe, picture_lines,
                                                             gpus=int(accelerator == "GPU"))
        answers.sort(key=record_key)
        rejects = sorted(rejects + malformed, key=record_key)
        storage.write_bytes(answers_uri, _jsonl(answers))  # whole: a temporary name, then a rename
        storage.write_bytes(rejects_uri, _jsonl(rejects))
        _write_pictures(picture_rows, questions, paths.eval_images, pictures_uri)
        seconds = time.time() - started  # a rerun that only rescores keeps the times of this inference

    metrics = _metrics(answers, rejects, len(questions) + len(malformed), seconds, answering_s)
    manifest = EvalManifest(identity=identity, trim_name=label, answers=answers_uri, rejects_file=rejects_uri,
                            metrics=metrics, reject_reasons=_count(r["reason"] for r in rejects))
    manifest.write(out_dir)  # the answers are complete: reused from here, even if scoring them fails below
    if storage.exists(paths.eval_annotations):
        metrics.update({k: float(v) for k, v in _score(answers, paths.eval_annotations, cfg.kind, questions).items()})
        manifest.write(out_dir)
    else:
        logger.info("no annotations at %s; answers are not scored", paths.eval_annotations)

    with Tracker(tracking_uri or default_tracking_uri(paths.root), experiment_name(recipe.name)) as tracker:
        manifest.mlflow_run_id = tracker.start(f"{model_id}-eval")
        params = {"model_dir": model_dir, "model_id": model_id, "trim_name": label, "trim": trim_cfg.to_dict(),
                  "eval": dataclasses.asdict(cfg), "questions": paths.eval_questions, "output": out_dir}
        pictures = _log_run(tracker, params, metrics, [answers_uri, rejects_uri], pictures_uri)
    manifest.write(out_dir)  # with the MLflow run
    logger.info("%d answers, %d rejects (%s) in %s; TRIM %s, %.1f visual tokens per image, %.3g questions/s "
                "(%.1f s answering); %d TRIM pictures in %s", len(answers), len(rejects),
                manifest.reject_reasons or "none", answers_uri, label, metrics["mean_visual_tokens"],
                metrics["questions_per_s"], metrics["inference_s"], pictures, pictures_uri)
    return manifest


def _metrics(answers: list[dict], rejects: list[dict], questions: int, seconds: float,
             answering_s: float) -> dict[str, float]:
    """Counts and times; questions_per_s = answers / seconds some actor spent answering (CLIP, TRIM
    and generation; not loading the model or reading images)."""
    visual = [a["metadata"]["visual_tokens"] for a in answers]
    answering_s = round(answering_s, 3)  # as stored: a rerun that only rescores recomputes the same rate
    return {"questions": questions, "answers": len(answers), "rejects": len(rejects),
            "mean_visual_tokens": float(np.mean(visual)) if visual else 0.0, "seconds": round(seconds, 2),
            "inference_s": answering_s,
            "questions_per_s": float(f"{len(answers) / answering_s:.4g}") if answering_s > 0 else 0.0}


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items()))


def _write_pictures(picture_rows: dict[int, tuple[list[int], np.ndarray]], questions: list[dict], image_root: str,
                    out_uri: str) -> None:
    """PNG pictures of the answered questions the actors returned scores for (by line), into out_uri:
    question-<id>.png, or question-<id>-line<line>.png for an id that questions share."""
    from collections import Counter

    from pipelines.images import read_image
    from pipelines.pictures import draw, safe_name

    storage.remove(out_uri)
    by_line = {q[LINE]: q for q in questions}
    shared = Counter(str(q["question_id"]) for q in questions)
    with tempfile.TemporaryDirectory() as directory:
        for line, (kept, scores) in picture_rows.items():
            question = by_line[line]
            qid = str(question["question_id"])
            name = f"{safe_name(picture_stem(question, shared))}.png"
            title = f"{qid}: {' '.join(question['text'].split())[:70]} ({len(kept)}/{len(scores)} kept)"
            path = draw(read_image(image_root, question["image"]), scores, kept, os.path.join(directory, name), title)
            storage.write_bytes(storage.join(out_uri, name), path.read_bytes())
