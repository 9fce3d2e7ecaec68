"""TRIM's results for a run of samples, on the host: what the encoder hands the cache writer. Apart from
pipelines/cache_format.py so the encoder needs no pyarrow (the GPU check imports it alone)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ReducedRows:
    """TRIM's results for consecutive samples, on the host: what a part's visual columns are made of.
    Rows without an image (text-only samples) have no tokens, scores or kept patches."""

    has_image: np.ndarray
    """[S] bool."""
    num_tokens: np.ndarray
    """[S] int32: kept + aggregate (0 without an image)."""
    num_kept: np.ndarray
    """[S] int32."""
    has_aggregate: np.ndarray
    """[S] bool."""
    tokens: np.ndarray
    """[sum(num_tokens), D] fp16: every sample's tokens, one after the other."""
    scores: np.ndarray
    """[S_image, N] fp16: the scores of the rows with an image, in order."""
    keep: np.ndarray
    """[S_image, N] bool: the patches kept, same rows as scores."""
