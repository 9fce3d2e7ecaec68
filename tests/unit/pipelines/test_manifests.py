"""The typed manifests read back what they wrote, and read older files (extra keys ignored); versioned
outputs: named by identity, resolved through CURRENT.json, retained by the keep rule, checked file by file."""

import json

import pyarrow as pa
import pytest

from pipelines import storage
from pipelines.manifests import (
    CURRENT_FILE,
    IDENTITY_FILE,
    CacheManifest,
    EvalManifest,
    KeptStats,
    ShardsManifest,
    check_files,
    publish,
    resolve_output,
    start_version,
    version_of,
)


def test_manifests_round_trip_through_their_folder(tmp_path):
    shards = ShardsManifest(input={"mixture": "m.json"}, samples=3, rejects=1, images=2, image_bytes=10,
                            image_files=1, per_source={"coco": 3}, per_reject_reason={"missing file": 1})
    shards.write(str(tmp_path / "shards"))
    assert ShardsManifest.read(str(tmp_path / "shards")) == shards
    cache = CacheManifest(encoder={"num_patches": 576}, trim={"keep": "least_similar"}, samples=3, visual_samples=2,
                          text_only_samples=1, kept=KeptStats(mean=120.0, mean_tokens=121.0), cache_bytes=100,
                          bytes_per_visual_sample=50.0, full_feature_bytes_per_image=1_179_648)
    cache.write(str(tmp_path / "cache"))
    again = CacheManifest.read(str(tmp_path / "cache"))
    assert again == cache and isinstance(again.kept, KeptStats)
    assert EvalManifest.read_if_exists(str(tmp_path / "eval")) is None


def test_a_manifest_with_keys_this_version_does_not_know_still_reads(tmp_path):
    data = {"identity": {}, "trim_name": "default", "answers": "a.jsonl", "rejects_file": "r.jsonl",
            "metrics": {"answers": 2.0}, "written_by": "a newer version"}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert EvalManifest.read(str(tmp_path)).metrics == {"answers": 2.0}


# Versioned outputs --------------------------------------------------------------------------------

def _complete(root, identity, rows=2):
    """A version written as a stage writes it: identity first, a data file, the manifest last."""
    folder = start_version(str(root), identity)
    storage.write_parquet(storage.join(folder, "samples-00000.parquet"), pa.table({"i": list(range(rows))}))
    ShardsManifest(input=identity, samples=rows, rejects=0, images=0, image_bytes=0, image_files=0,
                   version=version_of(identity), files={"samples-00000.parquet": rows}).write(folder)
    return version_of(identity)


def test_a_version_is_named_by_its_whole_identity_whatever_the_key_order():
    one = version_of({"mixture": {"size": 3, "sha256": "ab"}, "config": {"rows_per_shard": 50}})
    assert one == version_of({"config": {"rows_per_shard": 50}, "mixture": {"sha256": "ab", "size": 3}})
    assert one != version_of({"mixture": {"size": 3, "sha256": "ab"}, "config": {"rows_per_shard": 51}})
    assert one.startswith("v-") and len(one) == 14


def test_readers_resolve_the_current_version_of_a_root_or_read_a_version_folder(tmp_path):
    old = _complete(tmp_path, {"n": 1}, rows=3)
    publish(str(tmp_path), old, keep=2)
    new = _complete(tmp_path, {"n": 2}, rows=5)
    assert resolve_output(str(tmp_path)) == str(tmp_path / old)  # not current until published
    publish(str(tmp_path), new, keep=2)
    assert resolve_output(str(tmp_path)) == str(tmp_path / new)
    assert ShardsManifest.read(str(tmp_path)).samples == 5
    assert ShardsManifest.read(str(tmp_path / old)).samples == 3  # a version folder given directly
    assert storage.read_json(str(tmp_path / new / IDENTITY_FILE)) == {"n": 2}


def test_a_root_without_a_complete_output_is_named_in_the_error(tmp_path):
    start_version(str(tmp_path), {"n": 1})  # begun, never finished
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_output(str(tmp_path))
    assert ShardsManifest.read_if_exists(str(tmp_path)) is None


def test_publishing_keeps_the_newest_complete_versions_and_every_unfinished_one(tmp_path):
    root = str(tmp_path)
    versions = []
    for n in range(3):
        versions.append(_complete(tmp_path, {"n": n}))
        removed = publish(root, versions[-1], keep=2)
    assert removed == [versions[0]]
    unfinished = start_version(root, {"n": "running"})
    fourth = _complete(tmp_path, {"n": 3})
    assert publish(root, fourth, keep=2) == [versions[1]]
    assert sorted(n for n in storage.listdir(root) if n.startswith("v-")) == sorted(
        [versions[2], fourth, unfinished.rsplit("/", 1)[-1]])
    assert storage.read_json(str(tmp_path / CURRENT_FILE)) == {"version": fourth, "history": [fourth, versions[2]]}
    # The same identity again (a mixture changed back): made current, nothing rewritten or removed.
    assert publish(root, versions[2], keep=2) == []
    assert resolve_output(root) == str(tmp_path / versions[2])
    with pytest.raises(ValueError, match="at least 1"):
        publish(root, fourth, keep=0)


def test_check_files_names_a_missing_file_and_one_with_other_rows(tmp_path):
    version = _complete(tmp_path, {"n": 1}, rows=4)
    folder = str(tmp_path / version)
    check_files(folder, {"samples-00000.parquet": 4}, "shard")
    with pytest.raises(ValueError, match="samples-00000.parquet.*4 rows.*holds 3 rows"):
        storage.write_parquet(storage.join(folder, "samples-00000.parquet"), pa.table({"i": [1, 2, 3]}))
        check_files(folder, {"samples-00000.parquet": 4}, "shard")
    with pytest.raises(ValueError, match="samples-00001.parquet.*missing"):
        check_files(folder, {"samples-00001.parquet": 2}, "shard")
    with pytest.raises(ValueError, match="lists no files.*run shard again"):
        check_files(folder, {}, "shard")
