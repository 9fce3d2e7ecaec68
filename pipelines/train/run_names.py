"""Run names that follow the cache: train.run_name may hold {cache_version}, replaced by the version folder
name of the cache a run trains on (pipelines/train/runs.py decides what that means for resuming)."""

from __future__ import annotations

import re

CACHE_VERSION = "{cache_version}"
"""The placeholder train.run_name may hold: the finetune job replaces it with the version folder name of
the cache it trains on (TrainConfig.run_name)."""
VERSION_PATTERN = r"v-[0-9a-f]{12}"
"""A version folder's name (pipelines.manifests.version_of)."""


def expand_run_name(template: str, cache_version: str) -> str:
    """train.run_name with {cache_version} replaced by `cache_version`; a name without it as it is. Any
    other brace, or the placeholder twice, is refused: a typo would otherwise name runs."""
    name = template.replace(CACHE_VERSION, cache_version, 1)
    if "{" in name or "}" in name:
        raise ValueError(f"train.run_name {template!r}: the only placeholder it may hold, once, is {CACHE_VERSION}")
    if CACHE_VERSION in template and not re.fullmatch(VERSION_PATTERN, cache_version):
        raise ValueError(f"train.run_name {template!r}: {cache_version!r} is not a cache version (v- and 12 hex "
                         "digits); run precompute again to write a versioned cache")
    return name


def cache_version_of_run(template: str, name: str) -> str | None:
    """The cache version a run called `name` was named after by `template` (one holding {cache_version}),
    None when `name` is not one of the template's runs."""
    prefix, found, suffix = template.partition(CACHE_VERSION)
    if not found:
        return None
    match = re.fullmatch(re.escape(prefix) + f"({VERSION_PATTERN})" + re.escape(suffix), name)
    return match.group(1) if match else None
