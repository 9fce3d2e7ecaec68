"""TRIM (Token Reduction using CLIP Metric) for LLaVA-style models: the method, pure PyTorch.

Nothing here imports Ray, DeepSpeed or MLflow, so the method can be used alone. The method's functions
load torch on first use: a job's driver reads TrimConfig (recipes) without paying for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trim.config import TrimConfig

if TYPE_CHECKING:
    from trim.core import TrimOutput, count_kept, patch_scores, trim_tokens

__all__ = ["TrimConfig", "TrimOutput", "count_kept", "patch_scores", "trim_tokens"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trim import core

        return getattr(core, name)
    raise AttributeError(f"module 'trim' has no attribute {name!r}")
