"""Reference: trim/core.py as it was before vectorisation, copied verbatim (names prefixed
`reference_` / `Reference` so they do not clash). The vectorised `trim.core` must give identical
outputs; tests/unit/trim/test_core.py and benchmarks/bench_trim.py compare against this. Do not edit
the logic below.
"""
# ruff: noqa: UP035

# Original module docstring:
# """trim_tokens: score patches against the text, choose how many and which to keep, reduce.
#
# Pure PyTorch (and numpy for the quartiles, to match the released code's np.percentile). All
# arithmetic is in fp32 whatever the input dtype; the reduced tokens come back in the features' dtype.
# """

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trim.config import TrimConfig


@dataclass
class ReferenceTrimOutput:
    """What TRIM did to a batch of B images of N patches each."""

    keep_mask: torch.Tensor
    """[B, N] bool: the patches kept (all False for the "pool" baseline, whose tokens are pooled)."""
    scores: torch.Tensor
    """[B, N] fp32: the softmax values the threshold was applied to (after the sign flip, if any)."""
    num_kept: torch.Tensor
    """[B] long: patch tokens kept per image, the aggregate not counted."""
    tokens: list[torch.Tensor]
    """B tensors [k_i (+1 aggregate), D]: kept features in raster order, then the aggregate."""
    has_aggregate: torch.Tensor
    """[B] bool: whether tokens[i] ends with the aggregate token."""

    @property
    def num_tokens(self) -> list[int]:
        """Visual tokens per image as fed to the projector (kept + aggregate)."""
        return [int(t.shape[0]) for t in self.tokens]


def reference_patch_scores(patch_embeds: torch.Tensor, text_embeds: torch.Tensor, cfg: TrimConfig) -> torch.Tensor:
    """Softmax over the N patches of each image of the patch-text similarity, sign-flipped when the
    least similar patches are the ones kept (as the released code does). [B, N] fp32."""
    patches = patch_embeds.float()
    text = text_embeds.float()
    if cfg.similarity == "cosine":
        patches = F.normalize(patches, dim=-1)
        text = F.normalize(text, dim=-1)
    similarity = torch.einsum("bne,be->bn", patches, text)
    if cfg.keep == "least_similar":
        similarity = -similarity
    return torch.softmax(similarity, dim=-1)


def _reference_iqr_upper_bound(values: np.ndarray, multiplier: float) -> float:
    q1 = np.percentile(values, 25)
    q3 = np.percentile(values, 75)
    return q3 + multiplier * (q3 - q1)


def reference_count_kept(scores: torch.Tensor, cfg: TrimConfig) -> torch.Tensor:
    """How many patches each image keeps, [B] long, by the configured threshold."""
    batch, num_patches = scores.shape
    if cfg.threshold == "ratio":
        return torch.full((batch,), int(num_patches * cfg.ratio), dtype=torch.long)
    values = scores.detach().cpu().numpy().astype(np.float32)
    if cfg.iqr_scope == "batch":
        # Released code: outliers of the flattened batch give one ratio, hence one n for all.
        flat = values.reshape(-1)
        outliers = int((flat > _reference_iqr_upper_bound(flat, cfg.iqr_multiplier)).sum())
        ratio = outliers / len(flat)
        return torch.full((batch,), int(num_patches * ratio), dtype=torch.long)
    counts = [int((row > _reference_iqr_upper_bound(row, cfg.iqr_multiplier)).sum()) for row in values]
    return torch.tensor(counts, dtype=torch.long)


def _reference_select(scores_row: torch.Tensor, n: int, cfg: TrimConfig, seed: int) -> torch.Tensor:
    """Indices (ascending: raster order) of the n patches kept by the configured selection."""
    num_patches = scores_row.shape[0]
    if cfg.selection == "all" or n >= num_patches:
        return torch.arange(num_patches)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if cfg.selection == "trim":
        indices = torch.topk(scores_row, n, largest=True, sorted=False).indices
    elif cfg.selection == "uniform":
        indices = ((torch.arange(n, dtype=torch.float64) + 0.5) * num_patches / n).long()
    elif cfg.selection == "random":
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(num_patches, generator=generator)[:n]
    else:  # pragma: no cover - "pool" never selects
        raise AssertionError(cfg.selection)
    return torch.sort(indices).values


def _reference_check_inputs(features: torch.Tensor, patch_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    if features.dim() != 3 or patch_embeds.dim() != 3 or text_embeds.dim() != 2:
        raise ValueError(
            "reference_trim_tokens expects features [B, N, D], patch_embeds [B, N, E], text_embeds [B, E]; got "
            f"{tuple(features.shape)}, {tuple(patch_embeds.shape)}, {tuple(text_embeds.shape)}"
        )
    batch, num_patches, _ = features.shape
    if patch_embeds.shape[:2] != (batch, num_patches) or text_embeds.shape[0] != batch:
        raise ValueError(
            f"reference_trim_tokens: batch/patch dimensions disagree: features {tuple(features.shape)}, "
            f"patch_embeds {tuple(patch_embeds.shape)}, text_embeds {tuple(text_embeds.shape)}"
        )
    if patch_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"reference_trim_tokens: patch_embeds width {patch_embeds.shape[-1]} != text_embeds width {text_embeds.shape[-1]}"
        )
    if batch == 0 or num_patches == 0:
        raise ValueError(f"reference_trim_tokens: empty input, features {tuple(features.shape)}")
    for name, tensor in (("features", features), ("patch_embeds", patch_embeds), ("text_embeds", text_embeds)):
        finite = torch.isfinite(tensor.float()).reshape(batch, -1).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(f"reference_trim_tokens: {name} holds NaN or inf in batch item(s) {bad}")


def reference_trim_tokens(
    features: torch.Tensor,
    patch_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    cfg: TrimConfig | None = None,
    seeds: Sequence[int] | None = None,
) -> ReferenceTrimOutput:
    """Reduce each image's N patch features to the kept ones plus an aggregate token.

    features [B, N, D] are the projector's input (penultimate layer, CLS dropped); patch_embeds
    [B, N, E] the same patches through post_layernorm and visual_projection; text_embeds [B, E] the
    CLIP text embedding of each sample's text. `seeds` (one int per sample) seed the "random"
    baseline so that a sample's choice does not depend on its batch; default cfg.seed + index.
    """
    cfg = cfg or TrimConfig()
    _reference_check_inputs(features, patch_embeds, text_embeds)
    batch, num_patches, _ = features.shape
    scores = reference_patch_scores(patch_embeds, text_embeds, cfg)
    counts = reference_count_kept(scores, cfg)
    if cfg.selection == "all":
        counts = torch.full((batch,), num_patches, dtype=torch.long)
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(batch)]

    keep_mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    tokens: list[torch.Tensor] = []
    has_aggregate = torch.zeros(batch, dtype=torch.bool)
    for b in range(batch):
        n = int(counts[b])
        row = features[b].float()
        if cfg.selection == "pool":
            # Pooling to n tokens (at least one) replaces selection: no mask, no aggregate.
            n = max(n, 1)
            counts[b] = n
            pooled = F.adaptive_avg_pool1d(row.t().unsqueeze(0), n).squeeze(0).t()
            tokens.append(pooled.to(features.dtype))
            continue
        indices = _reference_select(scores[b], n, cfg, seeds[b])
        keep_mask[b, indices] = True
        kept = row[indices]
        rest = row[~keep_mask[b]]
        if cfg.aggregate and rest.shape[0] > 0:
            kept = torch.cat([kept, rest.mean(dim=0, keepdim=True)], dim=0)
            has_aggregate[b] = True
        tokens.append(kept.to(features.dtype))
    return ReferenceTrimOutput(
        keep_mask=keep_mask.to(features.device),
        scores=scores,
        num_kept=counts,
        tokens=tokens,
        has_aggregate=has_aggregate,
    )
