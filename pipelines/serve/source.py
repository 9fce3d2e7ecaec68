"""Where the served model's files come from: a model directory (local or s3://), or a version of a
model in MLflow's registry (`models:/<name>/<version>` or `models:/<name>@<alias>`; the fine-tuning
job registers each model it exports, pipelines.tracking.Tracker.log_model), read from the tracking
server in MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines import storage

REGISTRY_PREFIX = "models:/"


def is_registered(uri: str) -> bool:
    return uri.startswith(REGISTRY_PREFIX)


@contextmanager
def local_model(uri: str, skip_suffixes: tuple[str, ...] = ()) -> Iterator[str]:
    """A local directory holding the model's files while the context lasts (a temporary copy of
    S3 or registry files, removed after; a local directory as it is). skip_suffixes: files left out
    of an S3 copy (a registry download takes the whole model)."""
    if is_registered(uri):
        import mlflow

        scratch = tempfile.mkdtemp(prefix="trim-serve-")
        try:
            yield mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    local = storage.local_copy(uri, skip_suffixes=skip_suffixes)
    try:
        yield local
    finally:
        if local != uri:
            shutil.rmtree(local, ignore_errors=True)


def model_settings(model_dir: str) -> dict:
    """The settings a local model directory records (trim_llava.json)."""
    from trim.model_files import SETTINGS_FILE

    return json.loads((Path(model_dir) / SETTINGS_FILE).read_text())


def recorded_clip_path(model_dir: str, uri: str) -> str:
    """The CLIP checkpoint a local model directory (copied from uri) records."""
    path = model_settings(model_dir).get("encoder", {}).get("path")
    if not path:
        raise ValueError(f"{uri} records no CLIP path: set clip_path in the serve config")
    return path
