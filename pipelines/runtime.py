"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import os

# Environment a Ray worker needs to reach S3 and MLflow like the driver does. On a cluster started
# with `ray start`, workers inherit the raylet's environment, not the driver's, so pass these along.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "TOKENIZERS_PARALLELISM")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus
        # Ray Train's placement-group cleaner polls the State API, which the dashboard serves: without
        # it the cleaner warns every second. On loopback, like every server the project starts.
        kwargs["include_dashboard"] = True
        kwargs["dashboard_host"] = "127.0.0.1"
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("TRIM_PROGRESS", "1") == "1"
