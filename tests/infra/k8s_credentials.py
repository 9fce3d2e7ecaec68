"""No credential in a manifest or a text file: each finding is a readable string."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from .k8s_support import walk_dicts

SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY",
                         re.IGNORECASE)
REFERENCE_KEY = re.compile(r"(Name|Ref|Path|File)$")
"""camelCase keys that name where a secret is (secretName, secretRef...), not the secret itself."""
CREDENTIAL_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@", re.IGNORECASE),
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "a GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "a JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\."),
    "a secret assigned literally": re.compile(
        r"\b[A-Z0-9_]*(?:SECRET|PASSWORD|TOKEN|ACCESS_KEY)[A-Z0-9_]*=(?![\"']?\$)[^\s\"']+"),
}


def _is_literal(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != "" and not value.strip().startswith("$")


def credential_findings(obj: Any, where: str = "") -> list[str]:
    """Credentials written into a manifest: a secret-named env var or key with a literal value, a
    Secret with data, or a string that looks like a key, a token or a URL with a password."""
    found = []
    for path, text in _walk_strings(obj):
        found += [f"{where}{path}: {label}" for label, rx in CREDENTIAL_PATTERNS.items() if rx.search(text)]
    for node in walk_dicts(obj):
        if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) and _is_literal(node.get("value")):
            found.append(f"{where}: env {node['name']} has a literal value (use valueFrom.secretKeyRef)")
        for key, value in node.items():
            if key not in ("name", "value") and SECRET_NAME.search(key) and not REFERENCE_KEY.search(key) \
                    and _is_literal(value):
                found.append(f"{where}: {key} holds a literal value")
    if isinstance(obj, dict) and obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        found.append(f"{where}: a Secret with values in the repository")
    return found


def text_credential_findings(text: str, where: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [f"{where}:{number}: {label}" for label, rx in CREDENTIAL_PATTERNS.items() if rx.search(line)]
    return found


def _walk_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_strings(item, f"{path}[{i}]")
