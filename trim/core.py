"""trim_tokens: score patches against the text, choose how many and which to keep, reduce.

Pure PyTorch, batched on the inputs' device whatever the batch size: one pass over the features
(per-image sums, which prove them finite and which the aggregate reuses), one scoring (whose
finiteness proves the embeddings'), one sort for the quartiles, one keep mask, one gather of the
kept rows, one split into per-image token lists. The
quartiles reproduce numpy's default percentile bit for bit (the released code, and this module
before it was batched, called np.percentile on the host), so the same patches are kept. Scores are
computed in fp32 or, with `score_dtype="encoder"`, in the inputs' dtype as the released code does;
the aggregate is an fp32 mean; the reduced tokens come back in the features' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trim.config import TrimConfig

# np.percentile on fp32 values: numpy < 2 interpolates in float64 and then compares the fp32 scores
# with the bound rounded to fp32 (value-based casting); numpy >= 2 stays in fp32 throughout (NEP 50).
# Follow the installed numpy, as the host code did.
_FLOAT64_QUARTILES = np.lib.NumpyVersion(np.__version__) < "2.0.0"


@dataclass
class TrimOutput:
    """What TRIM did to a batch of B images of N patches each."""

    keep_mask: torch.Tensor
    """[B, N] bool: the patches kept (all False for the "pool" baseline, whose tokens are pooled)."""
    scores: torch.Tensor
    """[B, N] fp32: the softmax values the threshold was applied to (after the sign flip, if any);
    with score_dtype "encoder" these are the encoder-dtype values, cast to fp32 exactly."""
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


def patch_scores(patch_embeds: torch.Tensor, text_embeds: torch.Tensor, cfg: TrimConfig) -> torch.Tensor:
    """Softmax over the N patches of each image of the patch-text similarity, sign-flipped when the
    least similar patches are the ones kept (as the released code does). [B, N], fp32 or, with
    score_dtype "encoder", the embeddings' dtype."""
    return torch.softmax(_similarity(patch_embeds, text_embeds, cfg), dim=-1)


def _similarity(patch_embeds: torch.Tensor, text_embeds: torch.Tensor, cfg: TrimConfig) -> torch.Tensor:
    """patch_scores before the softmax."""
    if cfg.score_dtype == "float32":
        patches, text = patch_embeds.float(), text_embeds.float()
    else:
        dtype = torch.promote_types(patch_embeds.dtype, text_embeds.dtype)
        patches, text = patch_embeds.to(dtype), text_embeds.to(dtype)
    if cfg.similarity == "cosine":
        patches = F.normalize(patches, dim=-1)
        text = F.normalize(text, dim=-1)
    similarity = torch.matmul(patches, text.unsqueeze(2)).squeeze(2)  # the released code's product
    return -similarity if cfg.keep == "least_similar" else similarity


def _percentile(ordered: torch.Tensor, q: int) -> torch.Tensor:
    """np.percentile(row, q) (method "linear") of each row of `ordered` (fp32, sorted ascending): the
    same virtual index (n - 1) * q / 100, neighbours and two-sided interpolation, so the same bits."""
    last = ordered.shape[-1] - 1
    virtual = last * (q / 100)
    below = min(math.floor(virtual), last)
    above = min(below + 1, last)
    gamma = virtual - below  # a multiple of 1/4 for q in {25, 75}; irrelevant when below == above
    low, high = ordered[..., below], ordered[..., above]
    diff = high - low
    if _FLOAT64_QUARTILES:
        low, high, diff = low.double(), high.double(), diff.double()
    if gamma < 0.5:
        return low + diff * gamma
    return high - diff * (1 - gamma)


def _iqr_outliers(values: torch.Tensor, multiplier: float) -> torch.Tensor:
    """[R, M] bool: the values (fp32, [R, M]) strictly above their row's Q3 + multiplier * IQR."""
    ordered = values.sort(dim=-1).values
    q1, q3 = _percentile(ordered, 25), _percentile(ordered, 75)
    upper = q3 + (q3 - q1) * multiplier
    return values > upper.to(values.dtype).unsqueeze(-1)


def count_kept(scores: torch.Tensor, cfg: TrimConfig) -> torch.Tensor:
    """How many patches each image keeps, [B] long (on the host), by the configured threshold."""
    batch, num_patches = scores.shape
    if cfg.threshold == "ratio":
        return torch.full((batch,), int(num_patches * cfg.ratio), dtype=torch.long)
    values = scores.detach().float()
    if cfg.iqr_scope == "batch":
        # Released code: outliers of the flattened batch give one ratio, hence one n for all.
        outliers = int(_iqr_outliers(values.reshape(1, -1), cfg.iqr_multiplier).sum())
        ratio = outliers / values.numel()
        return torch.full((batch,), int(num_patches * ratio), dtype=torch.long)
    return _iqr_outliers(values, cfg.iqr_multiplier).sum(dim=1).cpu()


def _baseline_indices(num_patches: int, n: int, cfg: TrimConfig, seed: int) -> torch.Tensor:
    """Indices (ascending: raster order) of the n patches a "uniform" or "random" baseline keeps."""
    if n >= num_patches:
        return torch.arange(num_patches)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if cfg.selection == "uniform":
        indices = ((torch.arange(n, dtype=torch.float64) + 0.5) * num_patches / n).long()
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(num_patches, generator=generator)[:n]
    return torch.sort(indices).values


def _counts_and_mask(scores: torch.Tensor, cfg: TrimConfig, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches kept per image ([B] long, host) and which ones ([B, N] bool, scores' device)."""
    batch, num_patches = scores.shape
    if cfg.selection == "all":
        return (torch.full((batch,), num_patches, dtype=torch.long),
                torch.ones(batch, num_patches, dtype=torch.bool, device=scores.device))
    if cfg.selection == "trim" and cfg.threshold == "iqr" and cfg.iqr_scope == "sample":
        # Each image's outliers are its top n, strictly above every other patch: no ties to break.
        outliers = _iqr_outliers(scores.detach().float(), cfg.iqr_multiplier)
        return outliers.sum(dim=1).cpu(), outliers
    counts = count_kept(scores, cfg)
    if cfg.selection == "trim":  # one n for the whole batch here: one batched top-n
        n = int(counts[0])
        mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=scores.device)
        if n >= num_patches:
            mask.fill_(True)
        elif n > 0:
            mask.scatter_(1, torch.topk(scores, n, dim=1, largest=True, sorted=False).indices, True)
        return counts, mask
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    for b in range(batch):  # baselines for ablations: simple, not the hot path
        mask[b, _baseline_indices(num_patches, int(counts[b]), cfg, seeds[b])] = True
    return counts, mask.to(scores.device)


def _reduce(
    features: torch.Tensor, keep_mask: torch.Tensor, aggregate: bool, feature_sums: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per image: the kept features in raster order, then (when some patch is left out and
    `aggregate`) the fp32 mean of the others, in the features' dtype. One gather, one split.
    feature_sums [B, D] fp32: each image's features summed over its patches."""
    batch, num_patches, dim = features.shape
    kept_counts = keep_mask.sum(dim=1)
    has_aggregate = (kept_counts < num_patches) & aggregate
    sizes = kept_counts + has_aggregate
    ends = torch.cumsum(sizes, dim=0)
    # Output rows, all images in one tensor: image b's kept rows, then its aggregate (whose slot
    # gathers row 0 and is overwritten).
    aggregate_slots = (ends - 1)[has_aggregate]
    is_kept = torch.ones(int(ends[-1]), dtype=torch.bool, device=features.device)
    is_kept[aggregate_slots] = False
    source = torch.zeros(is_kept.shape, dtype=torch.long, device=features.device)
    source[is_kept] = torch.nonzero(keep_mask.reshape(-1)).squeeze(1)
    out = features.reshape(batch * num_patches, dim).index_select(0, source)
    if aggregate_slots.numel():
        # The rest's sum is the total (already summed for the input check) less the kept rows' sum,
        # which one embedding-bag pass over the gathered rows gives in plain fp32 additions.
        kept_sums = F.embedding_bag(torch.nonzero(is_kept).squeeze(1), out.float(),
                                    torch.cumsum(kept_counts, dim=0) - kept_counts, mode="sum")
        means = (feature_sums - kept_sums) / (num_patches - kept_counts).unsqueeze(1).float()
        out[aggregate_slots] = means[has_aggregate].to(features.dtype)
    return list(torch.split(out, sizes.tolist())), has_aggregate.cpu()


def _pooled(features: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    """The "pool" baseline: each image's raster sequence average-pooled to its count (at least one)."""
    tokens = []
    for b, n in enumerate(counts.tolist()):
        row = features[b].float()
        tokens.append(F.adaptive_avg_pool1d(row.t().unsqueeze(0), n).squeeze(0).t().to(features.dtype))
    return tokens


def _check_shapes(features: torch.Tensor, patch_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    if features.dim() != 3 or patch_embeds.dim() != 3 or text_embeds.dim() != 2:
        raise ValueError(
            "trim_tokens expects features [B, N, D], patch_embeds [B, N, E], text_embeds [B, E]; got "
            f"{tuple(features.shape)}, {tuple(patch_embeds.shape)}, {tuple(text_embeds.shape)}"
        )
    batch, num_patches, _ = features.shape
    if patch_embeds.shape[:2] != (batch, num_patches) or text_embeds.shape[0] != batch:
        raise ValueError(
            f"trim_tokens: batch/patch dimensions disagree: features {tuple(features.shape)}, "
            f"patch_embeds {tuple(patch_embeds.shape)}, text_embeds {tuple(text_embeds.shape)}"
        )
    if patch_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"trim_tokens: patch_embeds width {patch_embeds.shape[-1]} != text_embeds width {text_embeds.shape[-1]}"
        )
    if batch == 0 or num_patches == 0:
        raise ValueError(f"trim_tokens: empty input, features {tuple(features.shape)}")


def _check_finite(feature_sums: torch.Tensor, similarity: torch.Tensor, features: torch.Tensor,
                  patch_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    """Raise, naming the tensor and the batch items, on a NaN or inf in any input. A NaN or inf
    propagates into any sum or dot product it enters (inf x 0 is NaN), so finite per-image feature
    sums and finite similarities prove the inputs finite without another pass over them; only when
    one is not (an overflow can also do that) is every value looked at."""
    if bool(torch.isfinite(feature_sums).all()) and bool(torch.isfinite(similarity).all()):
        return
    batch = features.shape[0]
    for name, tensor in (("features", features), ("patch_embeds", patch_embeds), ("text_embeds", text_embeds)):
        finite = torch.isfinite(tensor).reshape(batch, -1).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(f"trim_tokens: {name} holds NaN or inf in batch item(s) {bad}")


def trim_tokens(
    features: torch.Tensor,
    patch_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    cfg: TrimConfig | None = None,
    seeds: Sequence[int] | None = None,
) -> TrimOutput:
    """Reduce each image's N patch features to the kept ones plus an aggregate token.

    features [B, N, D] are the projector's input (penultimate layer, CLS dropped); patch_embeds
    [B, N, E] the same patches through post_layernorm and visual_projection; text_embeds [B, E] the
    CLIP text embedding of each sample's text. `seeds` (one int per sample) seed the "random"
    baseline so that a sample's choice does not depend on its batch; default cfg.seed + index.
    All of it runs batched on the inputs' device; keep_mask, scores and tokens stay there.
    """
    cfg = cfg or TrimConfig()
    _check_shapes(features, patch_embeds, text_embeds)
    batch, num_patches, _ = features.shape
    feature_sums = features.sum(dim=1, dtype=torch.float32)  # [B, D]: the aggregate reuses them
    similarity = _similarity(patch_embeds, text_embeds, cfg)
    _check_finite(feature_sums, similarity, features, patch_embeds, text_embeds)
    scores = torch.softmax(similarity, dim=-1)
    if cfg.selection == "pool":
        # Pooling to n tokens (at least one) replaces selection: no mask, no aggregate.
        counts = count_kept(scores, cfg).clamp(min=1)
        return TrimOutput(
            keep_mask=torch.zeros(batch, num_patches, dtype=torch.bool, device=features.device),
            scores=scores.float(), num_kept=counts, tokens=_pooled(features, counts),
            has_aggregate=torch.zeros(batch, dtype=torch.bool),
        )
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(batch)]
    counts, keep_mask = _counts_and_mask(scores, cfg, seeds)
    tokens, has_aggregate = _reduce(features, keep_mask, cfg.aggregate, feature_sums)
    return TrimOutput(keep_mask=keep_mask, scores=scores.float(), num_kept=counts, tokens=tokens,
                      has_aggregate=has_aggregate)
