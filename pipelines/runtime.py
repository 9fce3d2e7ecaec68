"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import logging
import os
from typing import Any

# Environment a Ray worker needs to reach S3 and MLflow like the driver does. On a cluster started
# with `ray start`, workers inherit the raylet's environment, not the driver's, so pass these along.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "TOKENIZERS_PARALLELISM")


def quiet_local_ray() -> None:
    """Run in every Ray worker. Ray Train's placement-group cleaner asks the State API (served by the
    dashboard) about the controller every second and warns each time it cannot; without a dashboard
    that is every second of a local run. On a cluster with a dashboard it never warns."""
    from pipelines.logs import setup_logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    setup_logging()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "pipelines.runtime.quiet_local_ray"}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        # No dashboard for a local run: on a small machine it takes CPU from training (measured with
        # benchmarks/bench_train.py: pipeline / bare step-time ratio 0.79 with it, 1.02 without).
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("TRIM_PROGRESS", "1") == "1"
