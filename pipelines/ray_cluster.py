"""Starting or joining Ray the same way from every job: the workers' environment, and Ray's own
console output kept at WARNING unless asked for.

Credentials never travel through Ray: a job's runtime_env is readable by anyone who can list jobs
(`ray job list`, the dashboard's jobs API) and is written to the runtime-env agent's log. Each Ray
worker reads credentials from its own environment instead, which it inherits from the raylet that
started it: for a local cluster (`ray.init()` without an address) the raylet is started by the
driver and inherits the driver's environment; for `ray start` (a node on this machine or a pod on
Kubernetes) it inherits the environment of the shell or container that ran `ray start`, which on
Kubernetes holds the Secret trim-credentials (envFrom) or a service account's web identity.
Only settings that are not secret are forwarded to the workers (pipelines.redaction names the secret ones).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from pipelines.redaction import SECRET_ENV, has_credentials, redact_uri

logger = logging.getLogger(__name__)

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI",
                 "TOKENIZERS_PARALLELISM", "TRIM_RAY_LOG_LEVEL")
"""Settings a worker needs to reach S3 and MLflow like the driver does, none of them secret. The AWS
key id is left out on purpose: forwarded without its secret it would pair with another one."""

WORKER_DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}
"""Set in every worker unless the driver sets them otherwise. THP_MEM_ALLOC_ENABLE: PyTorch backs CPU
tensors of 2 MB and more with transparent huge pages (where the kernel allows them, its "madvise" mode
included), so a fresh multi-hundred-MB feature batch or gather faults in 2 MB pages, not 4 KB ones:
trim_tokens at B=256, N=576 took 134 ms instead of 172 ms on this project's CPU machine (bench_trim)."""

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", *SECRET_ENV)
"""What a worker must find in its own environment when the driver has it (names only are logged)."""


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The env_vars of the workers' runtime_env: FORWARDED_ENV where set, except a tracking URI that
    carries credentials (workers then use the MLFLOW_TRACKING_URI of their own environment)."""
    env = {k: environ[k] for k in FORWARDED_ENV if k in environ}
    if has_credentials(env.get("MLFLOW_TRACKING_URI", "")):
        logger.warning("MLFLOW_TRACKING_URI (%s) holds credentials: not passed to Ray workers; put them in "
                       "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD instead",
                       redact_uri(env.pop("MLFLOW_TRACKING_URI")))
    return env


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The workers' env_vars: WORKER_DEFAULTS (the driver's value where it sets one), then forwarded_env."""
    return {**{name: environ.get(name, value) for name, value in WORKER_DEFAULTS.items()}, **forwarded_env(environ)}


RAY_LOG_LEVEL_ENV = "TRIM_RAY_LOG_LEVEL"
"""The environment variable that asks for Ray's own log lines (e.g. TRIM_RAY_LOG_LEVEL=INFO: cluster
start, Ray Data's execution plans and statistics); unset, they are kept at WARNING, and the console
holds the stages' own progress lines. Ray keeps every line in its session logs either way."""


def ray_log_level(environ: Mapping[str, str]) -> int:
    """The level of Ray's own loggers: RAY_LOG_LEVEL_ENV's where it names a level, else WARNING."""
    level = logging.getLevelName(environ.get(RAY_LOG_LEVEL_ENV, "WARNING").strip().upper())
    return level if isinstance(level, int) else logging.WARNING


def train_logging() -> Any:
    """Ray Train's LoggingConfig at ray_log_level: its controller's and workers' own console lines
    ("Attempting to start training worker group", ...) at WARNING unless asked for; its log files
    under the session keep every line."""
    import ray.train

    return ray.train.LoggingConfig(log_level=logging.getLevelName(ray_log_level(os.environ)))


def progress_bars(environ: Mapping[str, str]) -> bool:
    """Whether Ray Data draws progress bars: TRIM_PROGRESS=1 or 0 where set, else where a terminal is
    attached to stderr (a log file gets the stages' own progress lines only)."""
    if environ.get("TRIM_PROGRESS") in ("0", "1"):
        return environ["TRIM_PROGRESS"] == "1"
    return sys.stderr.isatty()


class _NotBarsOff(logging.Filter):
    """Drops Ray Data's notice that progress bars are off: they are off on purpose (progress_bars)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data(level: int) -> None:
    """Ray Data's console lines at `level` (its execution plans and timings are INFO); its session log
    file keeps every line."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console handler of Ray Data's logging config
            handler.setLevel(max(level, handler.level))
            handler.addFilter(_NotBarsOff())


def quiet_local_ray() -> None:
    """Run in every Ray worker. Ray Train's placement-group cleaner asks the State API (served by the
    dashboard) about the controller every second and warns each time it cannot; without a dashboard
    that is every second of a local run. On a cluster with a dashboard it never warns."""
    import ray

    from pipelines.logs import setup_logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # The cleaner finds the cluster from RAY_ADDRESS; without it, where several Ray instances run on one
    # machine, its monitor thread dies with a traceback ("Found multiple active Ray instances").
    address = ray.get_runtime_context().gcs_address
    if address:
        os.environ.setdefault("RAY_ADDRESS", address)
    setup_logging()
    level = ray_log_level(os.environ)
    logging.getLogger("ray").setLevel(level)
    # Ray Train's worker context logs every report ("Reporting training result ...") under a logger named
    # after its file, outside "ray.train", where LoggingConfig's level does not reach.
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(max(level, logging.WARNING))


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one. Workers get
    credentials from their own environment (module docstring), never from the driver."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = {"env_vars": worker_env(os.environ),
                   "worker_process_setup_hook": "pipelines.ray_cluster.quiet_local_ray"}
    level = ray_log_level(os.environ)
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True, "logging_level": level}
    if os.environ.get("RAY_ADDRESS"):
        held = [name for name in CREDENTIAL_ENV if os.environ.get(name)]
        if held:
            logger.info("joining %s: workers read %s from their own nodes' environment, not the driver's",
                        redact_uri(os.environ["RAY_ADDRESS"]), ", ".join(held))
    else:
        # No dashboard for a local run: on a small machine it takes CPU from training (measured with
        # benchmarks/bench_train.py: pipeline / bare step-time ratio 0.79 with it, 1.02 without).
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = False
        # A new instance of our own: without an address, ray.init would join any cluster `ray start`
        # left running on this machine (another job's), with its resources and its code.
        kwargs["address"] = "local"
    ray.init(**kwargs)
    import ray.data  # sets its loggers up at import: adjusted after it

    quiet_ray_data(level)
    ray.data.DataContext.get_current().enable_progress_bars = progress_bars(os.environ)


def node_count() -> int:
    """The alive nodes of the Ray cluster this process joined (init_ray first). An autoscaling
    cluster may add nodes later: a cluster that starts with one node can still train on several."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))
