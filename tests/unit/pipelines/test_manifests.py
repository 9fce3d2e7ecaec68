"""The typed manifests read back what they wrote, and read older files (extra keys ignored)."""

import json

from pipelines.manifests import CacheManifest, EvalManifest, KeptStats, ShardsManifest


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
