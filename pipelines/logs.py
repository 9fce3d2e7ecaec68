"""One logging setup for every job and Ray worker: `HH:MM:SS stage: message`, the stage being the
module that logs (shard, precompute, train_worker, ...). Library code only calls logging.getLogger."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(stage)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
PROJECT_LOGGERS = ("pipelines", "trim", "jobs", "benchmarks", "studies", "synthetic")


class _StageName(logging.Filter):
    """Adds `stage`: the last part of the logger's name, or the package's for a stage's driver module
    (pipelines.shard.image_index -> image_index, pipelines.precompute.stage -> precompute)."""

    def filter(self, record: logging.LogRecord) -> bool:
        parts = record.name.split(".")
        record.stage = parts[-2] if parts[-1] == "stage" and len(parts) > 2 else parts[-1]
        return True


def setup_logging(level: int = logging.INFO, quiet: bool = False) -> None:
    """Send the project's loggers to stdout in one format (idempotent). `quiet` (a non-master
    training rank) keeps warnings and errors only, so each line appears once per job."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(_StageName())
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING if quiet else level)
        logger.propagate = False  # Ray's own root handler would print every line a second time
    quiet_libraries()


def quiet_libraries() -> None:
    """Keep the libraries' per-model progress bars and notices out of the jobs' output (Ray still
    keeps every worker's full output in its session logs)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    except ImportError:
        pass
    for name in ("DeepSpeed", "deepspeed", "ray.train"):  # "Setting accelerator to CPU", report dicts
        logging.getLogger(name).setLevel(logging.ERROR)
    # "Creating initial MLflow database tables...", "Stopping system metrics monitoring..."
    for name in ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
