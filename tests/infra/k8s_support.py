"""Reading the deployment in infra/k8s: its YAML, its overlays rendered by kustomize, the pins.

The overlays are rendered by the kustomize built into kubectl (`kubectl kustomize`), found as
$KUBECTL, the venv's kubectl (put there by tests/infra/install_kubectl.py) or the PATH's. The checks
of what is rendered live beside this module: k8s_schemas (validation), k8s_entrypoints,
k8s_credentials.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "infra" / "k8s"
STAGES = ("shard", "precompute", "finetune", "evaluate")

MIN_KUSTOMIZE = (5, 0)
"""Seen to render the overlays: v5.5.0 and v5.8.1. Debian's kubectl (1.20) bundles v2.0.3, which
cannot read their `patches:`."""
INSTALL_HINT = "install it with `.venv/bin/python tests/infra/install_kubectl.py` (or set KUBECTL)"


def load_yaml(path: Path) -> list[Any]:
    """The non-empty documents of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    # The vendored CRD schemas under infra/k8s/schemas/ are inputs of the checks, not manifests.
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if "schemas" not in p.relative_to(K8S_DIR).parts)


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def object_id(obj: dict) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('name') or meta.get('generateName', '?')}"


def walk_dicts(value: Any) -> Iterator[dict]:
    """Every mapping in a nested structure, outermost first."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from walk_dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_dicts(item)


def pyproject_pin(package: str) -> str:
    """The exact version pyproject.toml pins for `package` (e.g. 'ray' -> '2.60.0')."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise KeyError(f"pyproject.toml pins no exact version of {package}")


# --- kustomize, the one inside kubectl --------------------------------------------------------

class KustomizeError(Exception):
    """kustomize could not build an overlay; the message is kustomize's."""


@functools.cache
def kubectl() -> tuple[str | None, str]:
    """(path, '') of $KUBECTL where set, else of the venv's or the PATH's kubectl; or (None, why not)."""
    explicit = os.environ.get("KUBECTL")
    candidates = [explicit] if explicit else [str(Path(sys.prefix) / "bin" / "kubectl"), shutil.which("kubectl")]
    found = [c for c in candidates if c and Path(c).is_file()]
    if not found:
        return None, f"no kubectl at {explicit or f'{sys.prefix}/bin or on the PATH'}: {INSTALL_HINT}"
    result = subprocess.run([found[0], "version", "--client", "-o", "json"], capture_output=True, text=True)
    version = json.loads(result.stdout or "{}").get("kustomizeVersion", "")  # kubectl < 1.21 tells none
    if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < MIN_KUSTOMIZE:
        version = version or "version not reported"
        return None, f"{found[0]}: its kustomize ({version}) predates v{MIN_KUSTOMIZE[0]}: {INSTALL_HINT}"
    return found[0], ""


def render(directory: Path, kustomization: dict | None = None) -> list[dict]:
    """The objects `kubectl kustomize directory` prints. With `kustomization`, those of a copy of the
    directory whose kustomization.yaml is that dict instead (its paths relative to `directory`)."""
    path, why_not = kubectl()
    if path is None:
        raise KustomizeError(why_not)
    with tempfile.TemporaryDirectory() as tmp:
        if kustomization is not None:
            directory = _copy_with(directory, kustomization, Path(tmp))
        result = subprocess.run([path, "kustomize", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        raise KustomizeError(f"{directory}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def _copy_with(directory: Path, kustomization: dict, dest: Path) -> Path:
    """The files of `directory` in `dest`, with another kustomization.yaml. kustomize takes other
    folders only by relative paths, so the folders among the resources are rebased onto `dest`."""
    for file in directory.iterdir():
        if file.is_file() and file.name != "kustomization.yaml":
            shutil.copy(file, dest)
    resources = [r if (directory / r).is_file() else os.path.relpath((directory / r).resolve(), dest)
                 for r in kustomization.get("resources", [])]
    (dest / "kustomization.yaml").write_text(yaml.safe_dump({**kustomization, "resources": resources}))
    return dest


# --- the shipped objects, and changing a copy of one -------------------------------------------

def load(relative: str, kind: str | None = None) -> dict:
    """A fresh copy of the (only, or only `kind`) object in infra/k8s/<relative>."""
    docs = [d for d in load_yaml(K8S_DIR / relative) if kind is None or d["kind"] == kind]
    if len(docs) != 1:
        raise ValueError(f"{relative}: expected one {kind or 'object'}, found {len(docs)}")
    return docs[0]


def all_objects() -> list[tuple[str, dict]]:
    """('<file>#<index>', object) for every object in the manifests, kustomizations aside."""
    return [(f"{p.relative_to(K8S_DIR)}#{i}", obj) for p in manifest_files() if p.name != "kustomization.yaml"
            for i, obj in enumerate(load_yaml(p)) if obj.get("kind") != "Kustomization"]


def ray_jobs() -> list[tuple[str, dict]]:
    return [(label, o) for label, o in all_objects() if o["kind"] in ("RayJob", "RayCronJob")]


def configmaps(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o.get("kind") == "ConfigMap"}


def _parent(obj: dict, dotted: str) -> tuple[Any, Any]:
    *path, last = dotted.split(".")
    node: Any = obj
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, (int(last) if isinstance(node, list) else last)


def rename_at(obj: dict, dotted: str, new_name: str) -> None:
    """Renames the field at a dotted path (list indices as numbers), e.g. to misspell it."""
    node, key = _parent(obj, dotted)
    node[new_name] = node.pop(key)


def set_at(obj: dict, dotted: str, value: Any) -> None:
    """Sets the field at a dotted path; an index one past a list's end appends."""
    node, key = _parent(obj, dotted)
    if isinstance(node, list) and key == len(node):
        node.append(value)
    else:
        node[key] = value
