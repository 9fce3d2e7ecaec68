"""Replace a folder whole: write the new one beside it, then switch by renames.

A writer killed at any point leaves the complete old folder or the complete new one at the
destination. The one moment it holds neither is between the two renames of the switch; both
folders are then beside it (`<name>.old-<tag>`, `<name>.tmp-<tag>`, the same tag), and the next
writer (`settle`) puts the new one in place. One writer per destination at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

STAGED = ".tmp-"
"""Infix of a folder being written: `<name>.tmp-<tag>`."""
RETIRED = ".old-"
"""Infix of the folder being replaced while the switch runs: `<name>.old-<tag>`."""


def _siblings(dest: Path, infix: str) -> dict[str, Path]:
    """{tag: path} of the folders beside dest named `<dest name><infix><tag>`."""
    prefix = dest.name + infix
    if not dest.parent.is_dir():
        return {}
    return {p.name[len(prefix):]: p for p in dest.parent.iterdir() if p.name.startswith(prefix)}


def settle(dest: str | Path) -> None:
    """Finish or undo what a writer killed before the end left beside dest: a switch cut between its
    two renames is completed (its new folder was complete: the old one is moved aside only then);
    unfinished new folders and moved-aside old ones are removed."""
    dest = Path(dest)
    staged, retired = _siblings(dest, STAGED), _siblings(dest, RETIRED)
    if not dest.exists() and retired:
        tag = sorted(retired)[-1]
        if tag in staged:
            logger.warning("%s: completing the switch a killed writer left half done", dest)
            staged.pop(tag).rename(dest)
        else:
            logger.warning("%s: putting back the folder a killed writer had moved aside", dest)
            retired.pop(tag).rename(dest)
    for leftover in (*staged.values(), *retired.values()):
        logger.info("removing %s, left by a writer that did not finish", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def switch(staged: Path, dest: Path, tag: str) -> None:
    """Put the complete folder `staged` at dest: the old one aside, the new one in, the old one removed."""
    retired = dest.with_name(f"{dest.name}{RETIRED}{tag}")
    if dest.exists() or dest.is_symlink():
        dest.rename(retired)
    staged.rename(dest)
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired)
    elif os.path.lexists(retired):
        retired.unlink()


@contextlib.contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """An empty folder beside dest to write the new contents into. When the block ends normally the
    folder takes dest's place (`switch`); when it raises, the folder is removed and dest is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    settle(dest)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staged = dest.with_name(f"{dest.name}{STAGED}{tag}")
    staged.mkdir()
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    switch(staged, dest, tag)
