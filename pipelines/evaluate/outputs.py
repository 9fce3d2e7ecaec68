"""Where an evaluation's outputs go and when they may be reused.

Each evaluation writes into its own folder under `eval/`, named by the model's run name, the TRIM
setting and a hash of its identity: `eval/<run>-<trim>-<hash12>/` (answers.jsonl, rejects.jsonl,
pictures/, manifest.json). The identity covers everything that changes the answers: the model's files
(names, sizes, modification stamps), the CLIP checkpoint's files, the TRIM config used at inference,
the question file's bytes, the image folder's files, the generation settings, the device kind and the
version of the LLM tokenization (trim.llm_tokenizer.TOKENIZATION). The manifest is written once the
answers are (before they are scored); answers are reused only from a folder whose manifest carries the same
identity, so an evaluation that failed half way, or one of another model or TRIM setting, is never
scored as this one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pipelines import storage
from pipelines.config import Recipe
from pipelines.manifests import MANIFEST_FILE, EvalManifest
from trim import TrimConfig
from trim.llm_tokenizer import TOKENIZATION

ANSWERS_FILE = "answers.jsonl"
REJECTS_FILE = "rejects.jsonl"
PICTURES_DIR = "pictures"


def files_digest(uri: str) -> str:
    """SHA-256 over the (name, size, stamp) of every file under a folder: changes when a file is
    added, removed or rewritten, without reading the files."""
    return hashlib.sha256(json.dumps(storage.fingerprint(uri)).encode()).hexdigest() if storage.exists(uri) else ""


def identity(recipe: Recipe, model_dir: str, trim_cfg: TrimConfig, question_bytes: bytes, accelerator: str
             ) -> dict[str, Any]:
    """What the answers depend on; equal identities give the same answers. accelerator: "GPU" (bf16)
    or "CPU" (fp32), the device kind the actors answer on."""
    paths, cfg = recipe.paths, recipe.eval
    return {"model_dir": model_dir, "model_files": storage.fingerprint(model_dir), "model_id": recipe.train.run_name,
            "clip": paths.clip, "clip_files": files_digest(paths.clip), "trim": trim_cfg.to_dict(),
            "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "sort_window": cfg.sort_window,
            "tokenization": TOKENIZATION,
            "accelerator": accelerator,
            "questions": paths.eval_questions, "questions_sha256": hashlib.sha256(question_bytes).hexdigest(),
            "images": paths.eval_images, "images_files": files_digest(paths.eval_images)}


def identity_hash(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "x"


def output_dir(eval_dir: str, model_id: str, trim_label: str, value: dict[str, Any]) -> str:
    """This evaluation's folder: `<eval_dir>/<run>-<trim>-<first 12 hex of the identity hash>`."""
    return storage.join(eval_dir, f"{_slug(model_id)}-{_slug(trim_label)}-{identity_hash(value)[:12]}")


def stored(folder: str, value: dict[str, Any]) -> EvalManifest | None:
    """The manifest of complete answers of this identity in folder, or None: no manifest (never
    finished), another identity, or a file it names is gone."""
    manifest = EvalManifest.read_if_exists(folder)
    if manifest is None or manifest.identity != value:
        return None
    if not (storage.exists(manifest.answers) and storage.exists(manifest.rejects_file)):
        return None
    return manifest


def forget(folder: str) -> None:
    """Remove a folder's manifest before its answers are written again, so that a run that fails
    half way leaves a folder nothing reuses."""
    storage.remove(storage.join(folder, MANIFEST_FILE))
