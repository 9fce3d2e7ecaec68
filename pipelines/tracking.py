"""MLflow tracking, in one place and on rank 0 only.

Default store: a local sqlite file beside the run (or `./mlflow.db` when the run root is on S3); with
MLFLOW_TRACKING_URI, that server. A resumed run continues the same MLflow run (its id travels in the
Ray Train checkpoint). A Tracker is a context manager: the run ends FINISHED, or FAILED when the block
raises (KILLED on Ctrl-C).

Tracking never stops training and never gives up for good. Each call is tried a few times with a
short backoff; a call the server refuses (a bad value) is not retried. When the server cannot be
reached, the failure is logged once per kind of failure, metric calls are skipped for a cool-down
(growing while the server stays down) and every call gets a single try until one gets through. A
run that could not be started is started by the next call that reaches the server (with the params
logged before it).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pipelines.redaction import redact, redact_uri
from pipelines.tracking_store import artifact_location

logger = logging.getLogger(__name__)

# Our own retries below replace MLflow's (which would retry for minutes when the server is down).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

REFUSED_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                           "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"})
"""MLflow error codes that another try would get again: the server answered, and said no."""
MAX_COOLDOWN_S = 600.0
"""The longest wait between tries while the server stays unreachable."""
# Errors of the call itself (a missing artifact file, a bad value), not of the server.
LOCAL_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, TypeError, ValueError)


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


def _refused(err: Exception) -> bool:
    return isinstance(err, LOCAL_ERRORS) or getattr(err, "error_code", None) in REFUSED_CODES


@dataclass
class TrackerStats:
    """What tracking could not do, for the summary line at the end of a run."""

    tries: int = 0
    """Requests made (each try of each call)."""
    failed: int = 0
    """Calls that failed after all their tries."""
    skipped: int = 0
    """Calls not made: metrics during a cool-down, or calls needing a run that could not be started."""
    kinds: set[tuple[str, str]] = field(default_factory=set)
    """Kinds of failure seen (error type, MLflow error code), each logged once."""


class Tracker:
    """Rank 0's MLflow run (enabled=False: every method does nothing). Arguments beside the store:
    attempts per call, the first backoff in seconds (doubled at each try), the first cool-down in
    seconds (doubled after each further failure, up to MAX_COOLDOWN_S: a server that stays down costs
    one try now and then, not a share of every step)."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True, attempts: int = 3,
                 backoff_s: float = 0.5, cooldown_s: float = 30.0):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.attempts, self.backoff_s, self.cooldown_s = max(1, attempts), backoff_s, cooldown_s
        self.run_id: str | None = None
        self.stats = TrackerStats()
        self._client: Any = None
        self._wanted: tuple[str, str | None] | None = None  # (run name, run id to continue) until started
        self._pending_params: dict[str, str] = {}
        self._down_until = 0.0
        self._down_streak = 0  # transient failures since the last call that got through
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

    def cooling_down(self) -> bool:
        """True while the server recently failed: metric calls are skipped. Until a call gets through
        again, every call (metrics after the cool-down) gets a single try."""
        return time.monotonic() < self._down_until

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

    def _with_retries(self, what: str, fn: Callable[[], Any]) -> Any:
        tries = 1 if self._down_streak else self.attempts
        for attempt in range(tries):
            self.stats.tries += 1
            try:
                if self._client is None:
                    from mlflow import MlflowClient

                    self._client = MlflowClient(self.tracking_uri)
                result = fn()
            except Exception as err:  # any failure to reach or write to the store
                if _refused(err):
                    self._failed(what, err, transient=False)
                    return None
                if attempt + 1 == tries:
                    self._failed(what, err, transient=True)
                    return None
                time.sleep(self.backoff_s * 2**attempt)
            else:
                if self._down_streak:
                    logger.info("MLflow at %s answers again (%s); %d calls were skipped meanwhile",
                                redact_uri(self.tracking_uri), what, self.stats.skipped)
                    self._down_until, self._down_streak = 0.0, 0
                return result
        return None

    def _failed(self, what: str, err: Exception, transient: bool) -> None:
        self.stats.failed += 1
        if transient:
            self._down_streak += 1
            self._down_until = time.monotonic() + min(self.cooldown_s * 2 ** (self._down_streak - 1), MAX_COOLDOWN_S)
            self._client = None  # a new client next time: the store may have been the problem
        kind = (type(err).__name__, str(getattr(err, "error_code", "")))
        if kind in self.stats.kinds:
            return
        self.stats.kinds.add(kind)
        detail = redact(str(err))[:200]
        if transient:
            logger.warning("MLflow at %s failed (%s: %s: %s); going on without tracking, trying again after %.0f s",
                           redact_uri(self.tracking_uri), what, type(err).__name__, detail, self.cooldown_s)
        else:
            logger.warning("MLflow at %s refused %s (%s: %s); tracking goes on", redact_uri(self.tracking_uri),
                           what, type(err).__name__, detail)

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
            if not _refused(err):  # a refused value would be refused again: drop it
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
