"""Evaluation's CPU stage: each batch of questions' images fetched in one storage call, decoded, padded
to square and resized to 8-bit pixels (LLaVA's preprocessing up to the CLIP processor's rescale and
normalize, which the device does), as precompute's CPU stage. It runs in Ray Data tasks beside the
answering actors, so an actor's time goes to CLIP, TRIM and generation only: on a GPU the CPU's
decoding and resizing (~130 images/s per core) would otherwise bound full and TRIM alike.

The questions are tokenized here too (the TRIM scoring text for CLIP, the prompt for the LLM).

Rows handed on: kind "question" (record: the question; pixels: uint8 [3, H, W] bytes; shape: JSON;
inputs: JSON of trim.inference.QuestionInputs, "" when not tokenized) or kind "reject" (record:
question_id, line, reason, detail; a missing or unreadable image).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipelines import storage

MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
PREPARED_COLUMNS = ("kind", "record", "pixels", "shape", "inputs")
LINE = "_line"
"""Key under which a question carries its line in the question file through the job (pipelines.evaluate.stage):
what tells apart questions that share an id."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")

_HOSTS: dict[tuple[str, str, str], tuple[Any, Callable[[list[str]], list]]] = {}
"""Per worker process: (clip_path, model_dir, text_mode) -> (ClipHost, the tokenizing function)."""


def fetch_bytes(uris: Sequence[str]) -> list[bytes | BaseException]:
    """Each URI's bytes, or the exception reading it raised, in one storage call: the filesystem's
    `cat_ranges` over all of them (concurrent requests on S3). The URIs share one filesystem."""
    if not uris:
        return []
    fs, _ = storage.fsspec_fs(uris[0])
    return list(fs.cat_ranges([storage.fsspec_fs(uri)[1] for uri in uris], None, None, on_error="return"))


def decode_image(data: bytes) -> Any:
    """An RGB PIL image, fully decoded (a truncated file fails here)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _reject(question: dict, reason: str, detail: str) -> dict:
    line = {"line": question[LINE]} if LINE in question else {}
    return {"question_id": question["question_id"], **line, "reason": reason, "detail": detail}


def load_images(questions: Sequence[dict], image_root: str) -> tuple[list[tuple[dict, Any]], list[dict]]:
    """(question, image) pairs for the questions whose image reads, and rejects for the others. The
    images of all the questions are fetched together (one storage call), then decoded."""
    from pipelines.images import OUTSIDE_ROOT, OutsideRoot, resolve

    ok, rejects, wanted = [], [], []
    for question in questions:
        try:
            wanted.append((question, resolve(image_root, question["image"])))
        except OutsideRoot as err:
            rejects.append(_reject(question, OUTSIDE_ROOT, str(err)))
    for (question, uri), data in zip(wanted, fetch_bytes([uri for _, uri in wanted])):
        try:
            if isinstance(data, FileNotFoundError):
                rejects.append(_reject(question, MISSING_IMAGE, uri))
                continue
            if isinstance(data, BaseException):
                raise data
            ok.append((question, decode_image(data)))
        except Exception as err:  # PIL raises several kinds for a bad file; a directory, a denied read
            rejects.append(_reject(question, UNREADABLE_IMAGE, f"{uri}: {type(err).__name__}: {err}"[:500]))
    return ok, rejects


def prepare_questions(host, questions: Sequence[dict], image_root: str,
                      tokenize: Callable[[list[str]], list] | None = None) -> list[dict]:
    """The pure core: questions -> prepared rows (see the module doc), in the questions' order with
    the rejects first. host: a trim.encoders.ClipHost (the checkpoint's padding and resizing);
    tokenize: question texts -> their trim.inference.QuestionInputs (None: left to the actor)."""
    ok, rejects = load_images(questions, image_root)
    rows = [{"kind": "reject", "record": json.dumps(r), "pixels": b"", "shape": "[]", "inputs": ""} for r in rejects]
    if ok:
        pixels = host.prepare([image for _, image in ok]).numpy()
        inputs = [json.dumps(dataclasses.asdict(q)) for q in tokenize([q["text"] for q, _ in ok])] if tokenize else None
        rows += [{"kind": "question", "record": json.dumps(question), "pixels": pixels[i].tobytes(),
                  "shape": json.dumps(list(pixels.shape[1:])), "inputs": inputs[i] if inputs else ""}
                 for i, (question, _) in enumerate(ok)]
    return rows


def pixels_of(rows: Sequence[dict]) -> np.ndarray:
    """uint8 [B, 3, H, W] of prepared question rows."""
    return np.stack([np.frombuffer(r["pixels"], dtype=np.uint8).reshape(json.loads(r["shape"])) for r in rows])


def inputs_of(rows: Sequence[dict]) -> list | None:
    """The QuestionInputs of prepared question rows, None unless every row was tokenized."""
    from trim.questions import QuestionInputs

    if not rows or not all(r["inputs"] for r in rows):
        return None
    return [QuestionInputs(**json.loads(r["inputs"])) for r in rows]


# Ray wrapper ----------------------------------------------------------------------------------


def prepare_batch(batch: dict[str, Any], clip_path: str, model_dir: str, text_mode: str,
                  image_root: str) -> dict[str, list]:
    """Ray Data map_batches function: {"question": JSON strings} -> prepared rows' columns. The CLIP
    checkpoint's processor and tokenizer and the model's LLM tokenizer are loaded once per worker
    process (from S3: a local copy of their files but the weights)."""
    key = (clip_path, model_dir, text_mode)
    if key not in _HOSTS:
        from trim.encoders import ClipHost
        from trim.llm_tokenizer import load_llm_tokenizer
        from trim.questions import question_inputs

        clip = storage.local_copy(clip_path, skip_suffixes=WEIGHT_SUFFIXES)
        llm = storage.local_copy(storage.join(model_dir, "llm"), skip_suffixes=WEIGHT_SUFFIXES)
        host, tokenizer = ClipHost(clip), load_llm_tokenizer(llm)
        for local, uri in ((clip, clip_path), (llm, storage.join(model_dir, "llm"))):
            if local != uri:  # a temporary copy of S3 files, read now
                shutil.rmtree(local, ignore_errors=True)
        _HOSTS.clear()
        _HOSTS[key] = (host, lambda texts: question_inputs(host, tokenizer, texts, text_mode))  # type: ignore[arg-type]
    host, tokenize = _HOSTS[key]
    rows = prepare_questions(host, [json.loads(q) for q in batch["question"]], image_root, tokenize)
    return {name: [r[name] for r in rows] for name in PREPARED_COLUMNS}
