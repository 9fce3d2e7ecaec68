"""MLflow tracking, in one place and on rank 0 only.

Default store: a local sqlite file beside the run (or `./mlruns.db` when the run root is on S3); with
MLFLOW_TRACKING_URI, that server. If the server cannot be reached, training goes on and says so once.
A resumed run continues the same MLflow run (its id travels in the Ray Train checkpoint). A Tracker is
a context manager: the run ends FINISHED, or FAILED when the block raises.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

# Fail fast instead of retrying for minutes when the server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def experiment_name(recipe_name: str) -> str:
    """The MLflow experiment every stage of a recipe logs to."""
    return f"trim-llava-{recipe_name}"


def default_tracking_uri(root: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = os.path.abspath(root) if not root.startswith("s3://") else os.getcwd()
    return f"sqlite:///{os.path.join(base, 'mlflow.db')}"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (its folder's mlartifacts/);
    None (the server's choice) otherwise. Without this, MLflow puts them under the creating
    process's working directory (for a Ray Train worker, a temporary Ray session folder)."""
    if tracking_uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
    return None


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """Rank 0's MLflow run. Every method is a no-op once the server has failed (said once)."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._mlflow: Any = None
        self._warned = False
        self._active = False

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any failure to reach or write to the store
            self.enabled = False
            if not self._warned:
                self._warned = True
                logger.warning("MLflow at %s failed (%s: %s: %s); going on without tracking", self.tracking_uri,
                               what, type(err).__name__, str(err)[:200])
            return None

    def start(self, run_name: str, run_id: str | None = None) -> str | None:
        """Start a new run, or continue run_id (a resumed training)."""
        def _start():
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(self.tracking_uri)
            if run_id is None:
                location = artifact_location(self.tracking_uri)
                if location and mlflow.get_experiment_by_name(self.experiment) is None:
                    try:
                        mlflow.create_experiment(self.experiment, artifact_location=location)
                    except Exception:  # created meanwhile by another process: use theirs
                        pass
                mlflow.set_experiment(self.experiment)
                run = mlflow.start_run(run_name=run_name)
            else:
                run = mlflow.start_run(run_id=run_id)
            return run.info.run_id

        self.run_id = self._call("start run", _start)
        self._active = self.run_id is not None
        return self.run_id

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        self._call("log params", lambda: self._mlflow.log_params(flat))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log metrics", lambda: self._mlflow.log_metrics(metrics, step=step))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log artifact", lambda: self._mlflow.log_artifact(path, artifact_path))

    def log_dict(self, data: dict, name: str) -> None:
        self._call("log dict", lambda: self._mlflow.log_dict(data, name))

    def log_text(self, text: str, name: str) -> None:
        self._call("log text", lambda: self._mlflow.log_text(text, name))

    def log_table(self, data: dict[str, list], name: str) -> None:
        """A table artifact (columns of equal length), shown as a table in the MLflow UI."""
        self._call("log table", lambda: self._mlflow.log_table(data, name))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set tags", lambda: self._mlflow.set_tags(tags))

    def end(self, status: str = "FINISHED") -> None:
        if self._active:
            self._active = False
            self._call("end run", lambda: self._mlflow.end_run(status=status))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.end("FAILED" if kind is not None else "FINISHED")
