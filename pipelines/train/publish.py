"""Put a model directory at its place (local or s3://) so that a reader never takes a half-written or
mixed folder for a model.

Locally the new folder is written beside the old one and switched in by renames (trim.staging): a
crash at any point leaves the complete old model or the complete new one.

S3 has no rename, so the switch is an ordered copy keyed on the marker file (MARKER, the model's
settings: readers take a folder without it for no model, and name it):
  1. upload the new model to `<model>.tmp-<tag>/`, the marker last (a prefix with its marker is complete);
  2. delete `<model>/<marker>`: from here until step 4 readers refuse the folder, never read a mix;
  3. delete the files the new model does not have, copy the new ones in (server-side copies);
  4. copy the marker: `<model>` is the new model;
  5. delete `<model>.tmp-<tag>/`.
A crash before step 2 leaves the old model; after it, the complete new one stays under the .tmp-
prefix and the next publish to the same place finishes the switch from it (`settle_remote`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec

from pipelines import storage
from trim.model_files import SETTINGS_FILE
from trim.staging import STAGED, staged_dir

logger = logging.getLogger(__name__)

MARKER = SETTINGS_FILE
"""The file whose presence makes a folder a model; copied last."""


def _files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """'/'-separated names of the files under root, relative to it; [] if absent."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    return sorted(posixpath.relpath(p, root) for p in fs.find(root))


def _switch_from(fs: fsspec.AbstractFileSystem, staged: str, dest: str) -> None:
    """Steps 2 to 5 of the module docstring: make dest a copy of the complete prefix `staged`."""
    names = _files(fs, staged)
    if fs.exists(f"{dest}/{MARKER}"):
        fs.rm_file(f"{dest}/{MARKER}")
    for name in set(_files(fs, dest)) - set(names):
        fs.rm_file(f"{dest}/{name}")
    for name in names:
        if name != MARKER:
            fs.copy(f"{staged}/{name}", f"{dest}/{name}")
    fs.copy(f"{staged}/{MARKER}", f"{dest}/{MARKER}")
    fs.rm(staged, recursive=True)


def settle_remote(fs: fsspec.AbstractFileSystem, dest: str) -> None:
    """Finish a switch a killed publisher left: dest without its marker and a complete staged prefix
    beside it -> switch from that prefix; incomplete staged prefixes are removed."""
    dest = dest.rstrip("/")
    parent, prefix = posixpath.dirname(dest), posixpath.basename(dest) + STAGED
    fs.invalidate_cache(parent)
    staged = sorted(p.rstrip("/") for p in (fs.ls(parent, detail=False) if fs.exists(parent) else [])
                    if posixpath.basename(p.rstrip("/")).startswith(prefix))
    complete = [p for p in staged if fs.exists(f"{p}/{MARKER}")]
    if complete and not fs.exists(f"{dest}/{MARKER}"):
        logger.warning("%s has no %s: completing the switch from %s", dest, MARKER, complete[-1])
        _switch_from(fs, complete[-1], dest)
        staged.remove(complete[-1])
    for leftover in staged:
        logger.info("removing %s, left by a publisher that did not finish", leftover)
        fs.rm(leftover, recursive=True)


def publish_remote(fs: fsspec.AbstractFileSystem, local: str | Path, dest: str) -> None:
    """Upload the complete local model folder to dest on fs in the order of the module docstring."""
    dest = dest.rstrip("/")
    settle_remote(fs, dest)
    staged = f"{dest}{STAGED}{os.getpid()}-{secrets.token_hex(4)}"
    names = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    if MARKER not in names:
        raise ValueError(f"{local} is not a model folder (no {MARKER})")
    for name in [n for n in names if n != MARKER] + [MARKER]:
        fs.put_file(str(Path(local, name)), f"{staged}/{name}")
    _switch_from(fs, staged, dest)


@contextlib.contextmanager
def writing_model(destination: str) -> Iterator[Path]:
    """A local folder to save the model into; when the block ends normally the model is put at
    destination (local: switched in by renames; s3://: published in order). After an error,
    destination holds what it held before."""
    if not storage.is_s3(destination):
        with staged_dir(destination) as staged:
            yield staged
        return
    with tempfile.TemporaryDirectory(prefix="trim-model-") as local:
        yield Path(local)
        fs, path = storage.fsspec_fs(destination)
        publish_remote(fs, local, path)
