"""Where MLflow runs live: the experiment's name, the default store, whether a cluster can reach it,
and where artifacts go. The Tracker (pipelines/tracking.py) writes into them."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from pipelines.redaction import redact_uri

logger = logging.getLogger(__name__)


def experiment_name(recipe_name: str) -> str:
    """The MLflow experiment every stage of a recipe logs to."""
    return f"trim-llava-{recipe_name}"


def default_tracking_uri(root: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = os.path.abspath(root) if not root.startswith("s3://") else os.getcwd()
    return f"sqlite:///{os.path.join(base, 'mlflow.db')}"


def check_store_reachable(tracking_uri: str, num_nodes: int) -> None:
    """Refuse a store on one node's disk for a run on several nodes: rank 0 may run on another node,
    where MLflow would quietly create another database at the same path. (A server on one node's
    loopback fails loudly instead, and tracking goes on without it.) Raises ValueError with the fix."""
    if num_nodes > 1 and urlparse(tracking_uri).scheme in ("", "file", "sqlite"):  # a file, not a server
        raise ValueError(
            f"MLflow tracking store {redact_uri(tracking_uri)} is a file on this node's disk, but the Ray cluster "
            f"has {num_nodes} nodes: rank 0 may run on another node and cannot reach it. Set MLFLOW_TRACKING_URI "
            "to a tracking server every node can reach (e.g. http://mlflow.example:5000), or run on one node.")


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (its folder's mlartifacts/);
    None (the server's choice) otherwise. Without this, MLflow puts them under the creating
    process's working directory (for a Ray Train worker, a temporary Ray session folder)."""
    if tracking_uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
    return None
