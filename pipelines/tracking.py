"""MLflow tracking, in one place and on rank 0 only.

Default store: a local sqlite file beside the run (or `./mlflow.db` when the run root is on S3); with
MLFLOW_TRACKING_URI, that server. A resumed run continues the same MLflow run (its id travels in the
Ray Train checkpoint). A Tracker is a context manager: the run ends FINISHED, or FAILED when the block
raises (KILLED on Ctrl-C).

Tracking never stops training and never gives up for good (pipelines/tracking_client.py: retries,
cool-downs). A run that could not be started is started by the next call that reaches the server
(with the params logged before it).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pipelines.runtime import redact, redact_uri
from pipelines.tracking_client import RetryingClient, refused
from pipelines.tracking_store import artifact_location

logger = logging.getLogger(__name__)


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


class Tracker(RetryingClient):
    """Rank 0's MLflow run in `experiment` (enabled=False: every method does nothing); the other
    arguments are RetryingClient's."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True, attempts: int = 3,
                 backoff_s: float = 0.5, cooldown_s: float = 30.0):
        super().__init__(tracking_uri, attempts, backoff_s, cooldown_s)
        self.enabled = enabled
        self.experiment = experiment
        self.run_id: str | None = None
        self._wanted: tuple[str, str | None] | None = None  # (run name, run id to continue) until started
        self._pending_params: dict[str, str] = {}
        self._ended = False
        self._monitor: Any = None  # MLflow's system metrics monitor, while it runs

    def fail_unfinished(self, run_name: str) -> int:
        """Mark FAILED the runs named `run_name` that are still RUNNING: their process died before its
        Tracker could end them (a killed Ray Train worker). For the driver, after a failed fit; a
        resumed run continues the same MLflow run all the same. Returns how many runs it ended."""
        quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")

        def unfinished() -> list[Any]:
            found = self._client.get_experiment_by_name(self.experiment)
            query = f"tags.`mlflow.runName` = '{quoted}' and attributes.status = 'RUNNING'"
            return self._client.search_runs([found.experiment_id], query) if found else []

        runs = self._with_retries("find unfinished runs", unfinished) or []
        for run in runs:
            run_id: str = run.info.run_id
            self._with_retries("end run", functools.partial(self._client.set_terminated, run_id, "FAILED"))
            logger.info("MLflow run %s (%s) was left RUNNING: ended FAILED", run_id, run_name)
        return len(runs)

    # --- calling MLflow -----------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any], metric: bool = False) -> Any:
        """fn() in the run, tried as the module docstring says; None when it could not be done."""
        if not self.enabled or self._ended:
            return None
        if metric and self.cooling_down():
            self.stats.skipped += 1
            return None
        if self.run_id is None and not self._start_now():
            self.stats.skipped += 1
            return None
        return self._with_retries(what, fn)

    # --- the run ------------------------------------------------------------------------------

    def start(self, run_name: str, run_id: str | None = None) -> str | None:
        """Start a new run, or continue run_id (a resumed training). Returns the run's id, or None
        when the server cannot be reached now (a later call starts it)."""
        if not self.enabled:
            return None
        self._wanted = (run_name, run_id)
        self._start_now()
        return self.run_id

    def _start_now(self) -> bool:
        if self._wanted is None:
            return False
        run_id = self._with_retries("start run", self._open_run)
        if run_id is None:
            return False
        self.run_id, self._wanted = run_id, None
        if self._pending_params:
            self._call("log params", self._flush_params)
        return True

    def _open_run(self) -> str:
        from mlflow.exceptions import MlflowException

        client, (run_name, run_id) = self._client, self._wanted or ("", None)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning("MLflow run %s is not in %s: starting a new run %s", run_id,
                               redact_uri(self.tracking_uri), run_name)
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                client.create_experiment(self.experiment, artifact_location=artifact_location(self.tracking_uri))
            except MlflowException:  # created meanwhile by another process: use theirs
                pass
            found = client.get_experiment_by_name(self.experiment)
        return client.create_run(found.experiment_id, run_name=run_name).info.run_id

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self._ended:
            return
        if self._monitor is not None:
            self._stop_system_metrics()
        if self.run_id is not None:
            if self._pending_params:
                self._call("log params", self._flush_params)
            self._call("end run", lambda: self._client.set_terminated(self.run_id, status=status))
        self._ended = True
        if self.stats.failed or self.stats.skipped:
            logger.info("MLflow at %s: %d calls failed and %d were skipped in this run (run %s, %s)",
                        redact_uri(self.tracking_uri), self.stats.failed, self.stats.skipped, self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.end(end_status(error))

    # --- what is logged -----------------------------------------------------------------------

    def log_params(self, params: dict) -> None:
        """Params (nested dicts flattened, secrets blanked). Kept until they reach the server: a run
        that starts late gets them, and the next log_params or end() sends what failed."""
        if self.enabled:
            self._pending_params.update({k: str(redact(v))[:500] for k, v in flatten(params).items()})
            self._call("log params", self._flush_params)

    def _flush_params(self) -> None:
        params, self._pending_params = self._pending_params, {}
        try:
            self._batch(params=params)
        except Exception as err:
            if not refused(err):  # a refused value would be refused again: drop it
                self._pending_params = {**params, **self._pending_params}
            raise

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log metrics", lambda: self._batch(metrics=metrics, step=step), metric=True)

    def log_metric_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        """Several steps' metrics (step, values) in one request (MLflow takes up to 1000 values a request)."""
        for start in range(0, len(steps), 100):
            chunk = steps[start:start + 100]
            self._call("log metrics", lambda: self._batch_steps(chunk), metric=True)  # noqa: B023

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set tags", lambda: self._batch(tags={k: str(redact(v)) for k, v in tags.items()}))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log artifact", lambda: self._client.log_artifact(self.run_id, path, artifact_path))

    def log_dict(self, data: dict, name: str) -> None:
        self._call("log dict", lambda: self._client.log_dict(self.run_id, redact(data), name))

    def log_text(self, text: str, name: str) -> None:
        self._call("log text", lambda: self._client.log_text(self.run_id, redact(text), name))

    def log_table(self, data: dict[str, list], name: str) -> None:
        """A table artifact (columns of equal length), shown as a table in the MLflow UI."""
        self._call("log table", lambda: self._client.log_table(self.run_id, data, name))

    def log_model(self, local_dir: str, registered_name: str) -> str | None:
        """The model directory as the run's `model` artifact, registered as a new version of
        `registered_name` in MLflow's model registry; returns the version (None if it failed)."""
        def register() -> str:
            from mlflow.exceptions import MlflowException

            self._client.log_artifacts(self.run_id, local_dir, "model")
            try:
                self._client.create_registered_model(registered_name)
            except MlflowException as err:  # registered before: add a version
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            return self._client.create_model_version(registered_name, source=f"runs:/{self.run_id}/model",
                                                     run_id=self.run_id).version
        return self._call("log model", register)

    def start_system_metrics(self, interval_s: float = 5.0) -> None:
        """CPU, memory, disk, network and GPU figures every interval_s into the run (system/...); a
        continued run's go on after its last step."""
        def start() -> None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        if self._monitor is None:
            self._call("start system metrics", start)

    def _stop_system_metrics(self) -> None:
        """Stop the monitor and log what it sampled since it last logged: MLflow's monitor logs only
        at the end of each interval, so the last part of a run (all of one shorter than the interval)
        would otherwise be lost."""
        monitor, self._monitor = self._monitor, None

        def stop() -> None:
            monitor.finish()  # joins its thread and sends what it queued
            last = monitor.aggregate_metrics()
            if last:
                monitor.publish_metrics(last)
                monitor.mlflow_logger.flush()
        self._call("stop system metrics", stop)

    def _batch_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, [Metric(k, float(v), now, step) for step, values in steps
                                             for k, v in values.items()])

    def _batch(self, metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, str] | None = None,
               tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                               [Param(k, v) for k, v in (params or {}).items()],
                               [RunTag(k, v) for k, v in (tags or {}).items()])


def end_status(error: BaseException | None) -> str:
    """The MLflow status a run ends with, after a block that raised `error` (None: it did not)."""
    if error is None or (isinstance(error, SystemExit) and error.code in (0, None)):
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
