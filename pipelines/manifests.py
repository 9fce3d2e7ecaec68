"""The manifests the stages write last and their readers trust: typed, with from_json/to_json.

The JSON keys are the field names, so a manifest on disk reads the same as before these classes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipelines import storage

MANIFEST_FILE = "manifest.json"
"""A stage's manifest, in its output folder."""

T = TypeVar("T", bound="Manifest")


class Manifest:
    """JSON round trip for the dataclasses below; unknown keys (a newer writer) are kept out."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls: type[T], text: str | bytes) -> T:
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls: type[T], folder: str) -> T:
        """The manifest in `folder` (local or s3://)."""
        return cls.from_json(storage.read_bytes(storage.join(folder, MANIFEST_FILE)))

    @classmethod
    def read_if_exists(cls: type[T], folder: str) -> T | None:
        uri = storage.join(folder, MANIFEST_FILE)
        return cls.from_json(storage.read_bytes(uri)) if storage.exists(uri) else None

    def write(self, folder: str) -> None:
        storage.write_bytes(storage.join(folder, MANIFEST_FILE), self.to_json().encode())


@dataclass
class ShardsManifest(Manifest):
    """shards/manifest.json: what the shard stage read and wrote."""

    input: dict[str, Any]
    """Fingerprint of the input (mixture path, size, stamp, image root, shard config, version)."""
    samples: int
    """Samples kept."""
    rejects: int
    """Records set aside (rejects.parquet)."""
    images: int
    """Distinct images stored (by content hash)."""
    image_bytes: int
    """Bytes of the stored images."""
    image_files: int
    """images-NNNNN.parquet files written."""
    per_source: dict[str, int] = field(default_factory=dict)
    """Kept samples per mixture source."""
    per_reject_reason: dict[str, int] = field(default_factory=dict)
    """Rejects per reason."""
    seconds: float = 0.0
    """Wall time of the run that wrote the shards."""
    image_layout: str = ""
    """How the images tables are laid out: "hash-bucket" (pipelines.images.IMAGE_LAYOUT: an image is in
    the file its content key hashes to, rows sorted by key, one image per row group); "" for shards
    written before it (readers then index the files by reading their keys)."""
    sample_files: int = 0
    """samples-NNNNN.parquet files written (one per run of ShardConfig.rows_per_shard records)."""


@dataclass
class KeptStats:
    """Patches TRIM kept per image-bearing sample (the aggregate token not counted, but in mean_tokens)."""

    mean: float = 0.0
    median: float = 0.0
    min: int = 0
    max: int = 0
    mean_share: float = 0.0
    """mean / patches per image."""
    mean_tokens: float = 0.0
    """Visual tokens fed to the projector per image sample: kept + aggregate."""


@dataclass
class CacheManifest(Manifest):
    """cache/manifest.json: a complete TRIM cache."""

    encoder: dict[str, Any]
    """The CLIP encoder described (path, hashes, layer, num_patches, feature_dim, preprocessing)."""
    trim: dict[str, Any]
    """The TrimConfig the cache was made with."""
    samples: int
    """Rows of the cache."""
    visual_samples: int
    """Rows with an image."""
    text_only_samples: int
    """Rows without an image."""
    kept: KeptStats
    """Kept-patch statistics."""
    cache_bytes: int
    """Bytes of the cache's Parquet parts."""
    bytes_per_visual_sample: float
    """cache_bytes / visual_samples."""
    full_feature_bytes_per_image: int
    """What one image's 576 x D fp16 features would take uncut."""
    per_source: dict[str, int] = field(default_factory=dict)
    """Rows per mixture source."""
    seconds: float = 0.0
    """Wall time of the run that completed the cache."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheManifest:
        manifest = super().from_dict(data)
        if isinstance(manifest.kept, dict):
            manifest.kept = KeptStats(**manifest.kept)
        return manifest


@dataclass
class EvalManifest(Manifest):
    """eval/manifest.json: what produced the answers, and their counts and metrics."""

    identity: dict[str, Any]
    """Model files, TRIM config, generation settings and questions: equal identity = reusable answers."""
    trim_name: str
    """Short name of the TRIM setting ("default", "default/all", ...)."""
    answers: str
    """The answers file (LLaVA's answer-file format)."""
    rejects_file: str
    """Questions set aside, with reasons."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Counts, timing and scores."""
    reject_reasons: dict[str, int] = field(default_factory=dict)
    """Rejects per reason."""
    mlflow_run_id: str | None = None
    """The MLflow run the evaluation was logged to."""
