"""Starting or joining Ray the same way from every job, and keeping secrets in the process that has them.

Credentials never travel through Ray: a job's runtime_env is readable by anyone who can list jobs
(`ray job list`, the dashboard's jobs API) and is written to the runtime-env agent's log. Each Ray
worker reads credentials from its own environment instead, which it inherits from the raylet that
started it: for a local cluster (`ray.init()` without an address) the raylet is started by the
driver and inherits the driver's environment; for `ray start` (a node on this machine or a pod on
Kubernetes) it inherits the environment of the shell or container that ran `ray start`, which on
Kubernetes holds the Secret trim-credentials (envFrom) or a service account's web identity.
Only settings that are not secret are forwarded to the workers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI",
                 "TOKENIZERS_PARALLELISM")
"""Settings a worker needs to reach S3 and MLflow like the driver does, none of them secret. The AWS
key id is left out on purpose: forwarded without its secret it would pair with another one."""

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_AUTH_TOKEN")
"""Variables whose values are secret: never forwarded, and blanked wherever the project writes text
that others read (MLflow params and tags, log lines that name a URI)."""

WORKER_DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}
"""Set in every worker unless the driver sets them otherwise. THP_MEM_ALLOC_ENABLE: PyTorch backs CPU
tensors of 2 MB and more with transparent huge pages (where the kernel allows them, its "madvise" mode
included), so a fresh multi-hundred-MB feature batch or gather faults in 2 MB pages, not 4 KB ones:
trim_tokens at B=256, N=576 took 134 ms instead of 172 ms on this project's CPU machine (bench_trim)."""

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", *SECRET_ENV)
"""What a worker must find in its own environment when the driver has it (names only are logged)."""

_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@", re.IGNORECASE)
REDACTED = "***"


def redact_uri(uri: str) -> str:
    """The URI with any user:password@ part replaced: `http://alice:pw@host` -> `http://***@host`."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", uri)


def has_credentials(uri: str) -> bool:
    return _USERINFO.search(uri) is not None


def redact(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """`value` (a string, or nested dicts and lists of them) with every secret it might hold blanked:
    credentials inside URIs and the value of any SECRET_ENV variable set in `environ` (default: this
    process's environment). Other values are returned as they are."""
    environ = os.environ if environ is None else environ
    if isinstance(value, dict):
        return {k: redact(v, environ) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, environ) for v in value]
    if not isinstance(value, str):
        return value
    text = redact_uri(value)
    for name in SECRET_ENV:
        secret = environ.get(name, "")
        if len(secret) >= 4 and secret in text:  # shorter values would blank common words
            text = text.replace(secret, REDACTED)
    return text


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


def quiet_local_ray() -> None:
    """Run in every Ray worker. Ray Train's placement-group cleaner asks the State API (served by the
    dashboard) about the controller every second and warns each time it cannot; without a dashboard
    that is every second of a local run. On a cluster with a dashboard it never warns."""
    from pipelines.logs import setup_logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    setup_logging()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one. Workers get
    credentials from their own environment (module docstring), never from the driver."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = {"env_vars": worker_env(os.environ),
                   "worker_process_setup_hook": "pipelines.runtime.quiet_local_ray"}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
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
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("TRIM_PROGRESS", "1") == "1"


def node_count() -> int:
    """The alive nodes of the Ray cluster this process joined (init_ray first). An autoscaling
    cluster may add nodes later: a cluster that starts with one node can still train on several."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))
