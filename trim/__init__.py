"""TRIM (Token Reduction using CLIP Metric) for LLaVA-style models: the method, pure PyTorch.

Nothing here imports Ray, DeepSpeed or MLflow, so the method can be used alone.
"""

from trim.config import TrimConfig
from trim.core import TrimOutput, count_kept, patch_scores, trim_tokens

__all__ = ["TrimConfig", "TrimOutput", "count_kept", "patch_scores", "trim_tokens"]
