"""Keeping secrets in the process that has them: credentials blanked wherever the project writes text
that others read (MLflow params and tags, log lines that name a URI), and the names of the variables
that hold them (pipelines.ray_cluster forwards none of them to Ray's workers)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_AUTH_TOKEN")
"""Variables whose values are secret: never forwarded, and blanked wherever the project writes text
that others read (MLflow params and tags, log lines that name a URI)."""

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
