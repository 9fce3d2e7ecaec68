"""The manifests the stages write last and their readers trust: typed, with from_json/to_json; and
the versioned outputs they describe.

A data stage (shard, precompute) writes each output into a version folder of its root, named by a
hash of everything that makes the output (its identity): `<root>/v-<12 hex>/`. There it writes
identity.json first, then the data files, then manifest.json, which lists every file with its rows;
then `<root>/CURRENT.json` names the version (written whole: a local rename, one S3 PUT). Readers
given the root read the version CURRENT.json names; given a version folder, that folder; either way
only the files its manifest lists, each checked for its rows. A changed input is a new folder, so an
older or unfinished attempt is never read, and the newest `keep` complete versions are retained.

The JSON keys are the field names, so a manifest on disk reads the same as before these classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa

from pipelines import storage

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
"""A stage's manifest, in its output folder."""
CURRENT_FILE = "CURRENT.json"
"""At a stage's root: {"version": the current complete version's folder name, "history": the retained
complete versions, newest first}."""
IDENTITY_FILE = "identity.json"
"""In a version folder, written first: the identity the folder is named by."""
VERSION_PREFIX = "v-"

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
        """The manifest of the complete output at `folder` (local or s3://): a stage root (its current
        version, see resolve_output) or the folder that holds the manifest."""
        uri = storage.join(resolve_output(folder), MANIFEST_FILE)
        try:
            return cls.from_json(storage.read_bytes(uri))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} is missing: the output it names was removed or never finished") from None

    @classmethod
    def read_if_exists(cls: type[T], folder: str) -> T | None:
        """As read, or None where `folder` holds no complete output."""
        try:
            return cls.read(folder)
        except FileNotFoundError:
            return None

    def write(self, folder: str) -> None:
        storage.write_bytes(storage.join(folder, MANIFEST_FILE), self.to_json().encode())


@dataclass
class ShardsManifest(Manifest):
    """shards/manifest.json: what the shard stage read and wrote."""

    input: dict[str, Any]
    """The output's identity (pipelines.shard.stage: the mixture's size and SHA-256, the image root, the
    images' digest, the shard knobs that change the output, the layout version): version_of(input)
    names its folder."""
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
    """How the images tables are laid out: "hash-bucket" (pipelines.image_store.IMAGE_LAYOUT: an image is in
    the file its content key hashes to, rows sorted by key, one image per row group); "" for shards
    written before it (readers then index the files by reading their keys)."""
    sample_files: int = 0
    """samples-NNNNN.parquet files written (one per run of ShardConfig.rows_per_shard records)."""
    version: str = ""
    """The version folder (under the shards root) this output is in: version_of(input)."""
    files: dict[str, int] = field(default_factory=dict)
    """Every file of the output and its rows (samples-*, images-*, rejects, image index): what readers
    read, and all they read. Empty in manifests written before outputs were versioned."""


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
    identity: dict[str, Any] = field(default_factory=dict)
    """Everything the cache was made from (encoder and its weights, layer, dtype, TRIM config, the
    shards' version, layout): version_of(identity) names its folder."""
    version: str = ""
    """The version folder (under the cache root) this output is in."""
    files: dict[str, int] = field(default_factory=dict)
    """Every part of the cache and its rows: what readers read, and all they read."""

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


# Versioned outputs -------------------------------------------------------------------------------


def version_of(identity: dict[str, Any]) -> str:
    """The version folder name of an identity: "v-" and 12 hex digits of its canonical JSON's SHA-256."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return VERSION_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:12]


def read_current(root: str) -> dict[str, Any]:
    """The root's CURRENT.json ({} where there is none yet)."""
    uri = storage.join(root, CURRENT_FILE)
    return storage.read_json(uri) if storage.exists(uri) else {}


def resolve_output(uri: str) -> str:
    """The folder of the complete output `uri` stands for: the version CURRENT.json names where `uri`
    is a stage root, else `uri` itself where it holds a manifest (a version folder given directly)."""
    current = read_current(uri).get("version")
    if current:
        return storage.join(uri, current)
    if storage.exists(storage.join(uri, MANIFEST_FILE)):
        return uri
    raise FileNotFoundError(f"{uri} holds no complete output (neither {CURRENT_FILE} nor {MANIFEST_FILE}): "
                            "run the stage that writes it first")


def start_version(root: str, identity: dict[str, Any]) -> str:
    """The folder of the identity's version under `root`, its identity.json written (first, before any
    data); a folder of the same name with another identity (a hash collision) is refused."""
    folder = storage.join(root, version_of(identity))
    uri = storage.join(folder, IDENTITY_FILE)
    if storage.exists(uri):
        if storage.read_json(uri) != json.loads(json.dumps(identity, default=str)):
            raise RuntimeError(f"{uri} records another identity under the same version name; remove {folder}")
        return folder
    storage.makedirs(folder)
    storage.write_json(uri, identity)
    return folder


def publish(root: str, version: str, keep: int) -> list[str]:
    """Make `version` (complete: its manifest written) the root's current output, then remove the
    complete versions other than the newest `keep` (those made current last); unfinished ones (no
    manifest: being written, or stopped and waiting for a resume) are left. Returns those removed."""
    if keep < 1:
        raise ValueError(f"keep_versions must be at least 1 (the current version), not {keep}")
    history = [version] + [v for v in read_current(root).get("history", []) if v != version]
    kept = history[:keep]
    storage.write_json(storage.join(root, CURRENT_FILE), {"version": version, "history": kept})
    removed = []
    for name in storage.listdir(root):
        folder = storage.join(root, name)
        if name.startswith(VERSION_PREFIX) and name not in kept and storage.exists(storage.join(folder, MANIFEST_FILE)):
            storage.remove(folder)
            removed.append(name)
    if removed:
        logger.info("%s: removed %d older version(s) (%s); keeping %s", root, len(removed), ", ".join(removed),
                    ", ".join(kept))
    return removed


def check_files(folder: str, files: dict[str, int], stage: str) -> None:
    """Every file a manifest lists is in `folder` with the rows it records (Parquet footers, read in
    parallel); else a ValueError naming the file."""
    if not files:
        raise ValueError(f"{storage.join(folder, MANIFEST_FILE)} lists no files: written by an older version of "
                         f"the {stage} stage; run {stage} again")

    def rows(name: str) -> int | str:
        try:
            return storage.parquet_rows(storage.join(folder, name))
        except FileNotFoundError:
            return "it is missing"
        except (OSError, pa.ArrowException) as err:
            return f"it does not read as Parquet ({err})"

    names = sorted(files)
    with ThreadPoolExecutor(max_workers=16) as pool:
        found = dict(zip(names, pool.map(rows, names)))
    for name in names:
        if found[name] != files[name]:
            problem = found[name] if isinstance(found[name], str) else f"it holds {found[name]} rows"
            raise ValueError(f"{storage.join(folder, name)}: the {stage} manifest lists it with {files[name]} rows, "
                             f"but {problem}; run {stage} again")
