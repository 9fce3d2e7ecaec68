"""TrimConfig: every knob of TRIM in one typed, JSON-round-tripping config.

The default follows the authors' released scoring (docs/method.md) with the IQR taken per sample, so a
sample's tokens do not depend on its batch and can be cached offline. `paper()` and `official()` are
the two presets beside it; `fixed_ratio()` keeps a fixed share with the paper's scoring and
`official(ratio)` a fixed share with the released scoring (`TRIM:<ratio>`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Similarity = Literal["dot", "cosine"]
KeepEnd = Literal["least_similar", "most_similar"]
Threshold = Literal["iqr", "ratio"]
IqrScope = Literal["sample", "batch"]
Selection = Literal["trim", "uniform", "random", "pool", "all"]
TextMode = Literal["questions", "first_question", "conversation"]
ScoreDtype = Literal["encoder", "float32"]

_CHOICES = {
    "similarity": ("dot", "cosine"),
    "keep": ("least_similar", "most_similar"),
    "threshold": ("iqr", "ratio"),
    "iqr_scope": ("sample", "batch"),
    "selection": ("trim", "uniform", "random", "pool", "all"),
    "text": ("questions", "first_question", "conversation"),
    "text_at_inference": ("questions", "first_question", "conversation"),
    "score_dtype": ("encoder", "float32"),
}


@dataclass(frozen=True)
class TrimConfig:
    """How TRIM scores, thresholds and reduces one image's patch tokens."""

    similarity: Similarity = "dot"
    """Patch-text score: "dot" (plain dot product of unnormalised CLIP embeddings, as the released
    code) or "cosine" (as the paper writes it)."""

    keep: KeepEnd = "least_similar"
    """Which end of the score is kept. The released code negates the score before the softmax, so it
    keeps the patches LEAST similar to the text; the paper describes keeping the most similar."""

    threshold: Threshold = "iqr"
    """"iqr": keep the outliers above Q3 + iqr_multiplier * IQR of the softmax scores;
    "ratio": keep int(N * ratio) patches with the highest softmax scores."""

    iqr_scope: IqrScope = "sample"
    """Over which values the quartiles are taken: "sample" (each image's own N scores; cacheable) or
    "batch" (all B*N scores of the micro-batch flattened, one count n for the whole batch, as the
    released code does)."""

    iqr_multiplier: float = 1.5
    """The k of Q3 + k * IQR."""

    ratio: float = 0.05
    """Share of the N patches kept when threshold == "ratio" (released `TRIM:<float>`)."""

    aggregate: bool = True
    """Append one token, the mean of the patch features not kept (none when all are kept)."""

    selection: Selection = "trim"
    """Which patches are kept once the count is known: "trim" (by score); ablation baselines with the
    same count: "uniform" (evenly spaced in raster order), "random" (seeded), "pool" (adaptive average
    pooling of the raster sequence into that many tokens, no aggregate), "all" (keep every patch)."""

    text: TextMode = "conversation"
    """Which text is embedded: "conversation" (the whole templated conversation, <image> removed, as
    the released code does in training), "questions" (all user turns) or "first_question"."""

    text_at_inference: TextMode = "first_question"
    """Which text is embedded at inference, where only the question is known."""

    batch_group_size: int = 4
    """For iqr_scope == "batch" offline (caching): samples are grouped in mixture order into
    consecutive groups of this many; each group is one "micro-batch" whose images share one IQR and
    one count (the released finetune_8gpu_TRIM.sh ran 4 samples per GPU). A text-only sample in a
    group contributes LLaVA's all-zero dummy image to the group's IQR, as released, and its result
    is discarded."""

    seed: int = 0
    """Seed of the "random" baseline; each sample's generator is seeded from (seed, sample index)."""

    score_dtype: ScoreDtype = "float32"
    """The dtype the scores are computed in: "float32" (embeddings upcast first: dot product, sign
    flip, softmax and quartiles in fp32 whatever the encoder's dtype) or "encoder" (no upcast: the
    dot product, sign flip and softmax in the embeddings' own dtype, e.g. bf16, and the quartiles
    over those values cast to fp32, exactly as the released code does; the top-n is taken on the
    encoder-dtype scores, so their ties and rounding are the released ones). The same at fp32."""

    def __post_init__(self) -> None:
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"TrimConfig.{field}={value!r}: expected one of {allowed}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"TrimConfig.ratio={self.ratio}: expected a share in [0, 1]")
        if self.iqr_multiplier < 0:
            raise ValueError(f"TrimConfig.iqr_multiplier={self.iqr_multiplier}: expected >= 0")
        if self.batch_group_size < 1:
            raise ValueError(f"TrimConfig.batch_group_size={self.batch_group_size}: expected >= 1")

    # Presets ---------------------------------------------------------------------------------

    @classmethod
    def paper(cls) -> TrimConfig:
        """The paper's literal method: cosine similarity, keep the most similar, IQR per sample."""
        return cls(similarity="cosine", keep="most_similar", threshold="iqr", iqr_scope="sample")

    @classmethod
    def official(cls, ratio: float | None = None) -> TrimConfig:
        """Exactly the released code, scores in the encoder's dtype. Without `ratio`, `TRIM:-1`:
        negated dot product, batch-wide IQR, one n for the batch. With it, `TRIM:<ratio>`: the same
        scoring, the top int(N * ratio) patches of each image."""
        if ratio is None:
            return cls(similarity="dot", keep="least_similar", threshold="iqr", iqr_scope="batch",
                       score_dtype="encoder")
        return cls(similarity="dot", keep="least_similar", threshold="ratio", ratio=ratio, iqr_scope="batch",
                   score_dtype="encoder")

    @classmethod
    def fixed_ratio(cls, ratio: float) -> TrimConfig:
        """Paper scoring (cosine, most similar kept, fp32), keep int(N * ratio) tokens plus the
        aggregate. Not the released `TRIM:<ratio>`, which keeps the least similar by the negated dot
        product: that is `official(ratio)`."""
        return cls(similarity="cosine", keep="most_similar", threshold="ratio", ratio=ratio)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrimConfig:
        """A preset by name ("default", "paper", "official", "official:<float>", "ratio:<float>") with
        field overrides."""
        if name == "default":
            base = cls()
        elif name == "paper":
            base = cls.paper()
        elif name == "official":
            base = cls.official()
        elif name.startswith("official:"):
            base = cls.official(float(name.split(":", 1)[1]))
        elif name.startswith("ratio:"):
            base = cls.fixed_ratio(float(name.split(":", 1)[1]))
        else:
            raise ValueError(
                f"unknown TRIM preset {name!r}: default, paper, official, official:<float> or ratio:<float>")
        return dataclasses.replace(base, **overrides)

    # Serialisation (written into cache manifests and model directories) ----------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrimConfig:
        """A config from `to_dict`'s output; fields missing (dicts written before they existed) take
        their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"TrimConfig: unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrimConfig:
        return cls.from_dict(json.loads(text))
