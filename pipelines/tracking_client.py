"""Calls to an MLflow store that never stop training and never give up for good.

Each call is tried a few times with a short backoff; a call the server refuses (a bad value) is not
retried. When the server cannot be reached, the failure is logged once per kind of failure, metric
calls are skipped for a cool-down (growing while the server stays down) and every call gets a single
try until one gets through. The Tracker (pipelines/tracking.py) makes its calls through this.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.runtime import redact, redact_uri

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


def refused(err: Exception) -> bool:
    """The server answered and said no (or the call itself was bad): another try would get the same."""
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


class RetryingClient:
    """An MlflowClient made on first use, its calls tried as the module docstring says. Arguments beside
    the store: attempts per call, the first backoff in seconds (doubled at each try), the first
    cool-down in seconds (doubled after each further failure, up to MAX_COOLDOWN_S: a server that
    stays down costs one try now and then, not a share of every step)."""

    def __init__(self, tracking_uri: str, attempts: int = 3, backoff_s: float = 0.5, cooldown_s: float = 30.0):
        self.tracking_uri = tracking_uri
        self.attempts, self.backoff_s, self.cooldown_s = max(1, attempts), backoff_s, cooldown_s
        self.stats = TrackerStats()
        self._client: Any = None
        self._down_until = 0.0
        self._down_streak = 0  # transient failures since the last call that got through

    def cooling_down(self) -> bool:
        """True while the server recently failed: metric calls are skipped. Until a call gets through
        again, every call (metrics after the cool-down) gets a single try."""
        return time.monotonic() < self._down_until

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
                if refused(err):
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
