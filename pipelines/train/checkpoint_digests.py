"""SHA-256 digests of a checkpoint's files: computed by each rank at save, merged into one list, and
recomputed before loading (pipelines/train/checkpoints.py decides what to refuse)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DIGESTS_FILE = "digests.json"
"""{"algorithm": "sha256", "files": {relative name: hex digest}} of every file the ranks saved; written
by rank 0 before the complete marker."""


def digest_file(path: str | Path) -> str:
    """SHA-256 of a file, streamed (shards are gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def walk(directory: str | Path) -> tuple[list[str], list[str]]:
    """(regular files, anything else: links, pipes) under directory, as '/'-separated relative names."""
    files: list[str] = []
    others: list[str] = []
    for top, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = os.path.join(top, name)
            relative = Path(os.path.relpath(path, directory)).as_posix()
            (files if os.path.isfile(path) and not os.path.islink(path) else others).append(relative)
    return sorted(files), sorted(others)


def digest_tree(directory: str | Path) -> dict[str, str]:
    """{relative name: SHA-256} of every regular file under directory."""
    files, _ = walk(directory)
    return {name: digest_file(os.path.join(directory, name)) for name in files}


def merge(per_rank: list[dict[str, str]]) -> dict[str, str]:
    """One digest list from every rank's: a name two ranks wrote with different bytes cannot be
    checked (the folder keeps one of them), so it is an error."""
    merged: dict[str, str] = {}
    for rank, digests in enumerate(per_rank):
        for name, digest in digests.items():
            if merged.setdefault(name, digest) != digest:
                raise RuntimeError(f"checkpoint file {name} was written by several ranks with different bytes "
                                   f"(rank {rank} among them); it cannot be verified")
    return dict(sorted(merged.items()))
