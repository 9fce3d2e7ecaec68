"""Shard and precompute as real Ray Data jobs: locally, killed and resumed, and against moto S3."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import storage
from pipelines.cache_format import decode_scores, decode_tokens, iter_cache
from pipelines.config import PrecomputeConfig, ShardConfig
from pipelines.precompute import run_precompute
from pipelines.shard import run_shard
from tests.integration.conftest import REPO, job_env, run_job
from trim import TrimConfig, trim_tokens
from trim.conversation import trim_text
from trim.encoders import ClipEncoder

EXPECTED_REJECTS = {
    "bad-missing-file": "missing file",
    "bad-corrupt-image": "unreadable image",
    "bad-malformed": "malformed conversation",
    "bad-no-conversations": "malformed conversation",
    "bad-tag-without-image": "<image> tag without image",
    "bad-image-without-tag": "image without <image> tag",
    "bad-empty-turn": "empty turn",
}
SHARD_CFG = ShardConfig(rows_per_shard=50, images_per_shard=16, read_batch_size=32, concurrency=2)
PRECOMPUTE_CFG = PrecomputeConfig(batch_size=8, rows_per_file=40)


@pytest.fixture(scope="module")
def shards(tiny_data, ray_local):
    out = str(tiny_data / "shards")
    manifest = run_shard(str(tiny_data / "data" / "llava_v1_5_mix665k.json"), str(tiny_data / "data" / "images"),
                         out, SHARD_CFG)
    return out, manifest


@pytest.fixture(scope="module")
def cache(shards, tiny_data, tiny_models):
    out = str(tiny_data / "cache")
    manifest = run_precompute(shards[0], out, str(tiny_models.clip), TrimConfig(), PRECOMPUTE_CFG)
    return out, manifest


def test_shard_sets_aside_every_bad_record_by_name_and_loses_nothing(shards, tiny_data):
    out, manifest = shards
    records = json.loads((tiny_data / "data" / "llava_v1_5_mix665k.json").read_text())
    rejects = storage.read_parquet(f"{out}/rejects.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
    assert all(r["detail"] for r in rejects)
    samples = [row for name in storage.listdir(out, ".parquet") if name.startswith("samples-")
               for row in storage.read_parquet(f"{out}/{name}").to_pylist()]
    assert len(samples) + len(rejects) == len(records) == manifest.samples + manifest.rejects
    assert sorted(s["index"] for s in samples) + [] == sorted(set(range(len(records))) - {r["index"] for r in rejects})
    assert manifest.per_reject_reason["malformed conversation"] == 2
    assert sum(manifest.per_source.values()) == len(samples)
    # Images: one row per distinct content, every sample's key among them, bytes intact.
    images = [row for name in storage.listdir(out, ".parquet") if name.startswith("images-")
              for row in storage.read_parquet(f"{out}/{name}").to_pylist()]
    keys = {row["image_key"] for row in images}
    assert len(keys) == len(images) == manifest.images
    distinct_paths = {s["image_path"] for s in samples if s["image_path"]}
    assert len(keys) == len(distinct_paths) < sum(1 for s in samples if s["image_path"])
    assert {s["image_key"] for s in samples if s["image_path"]} == keys
    sample = next(s for s in samples if s["image_path"])
    stored = next(row for row in images if row["image_key"] == sample["image_key"])
    assert stored["bytes"] == (tiny_data / "data" / "images" / sample["image_path"]).read_bytes()
    text_only = [s for s in samples if not s["image_path"]]
    assert text_only and all(s["source"] == "sharegpt" and s["image_key"] is None for s in text_only)


def test_shard_rerun_is_a_no_op_and_a_fresh_run_writes_the_same_files(shards, tiny_data):
    out, manifest = shards
    before = {n: storage.read_bytes(f"{out}/{n}") for n in storage.listdir(out)}
    again = run_shard(str(tiny_data / "data" / "llava_v1_5_mix665k.json"), str(tiny_data / "data" / "images"),
                      out, SHARD_CFG)
    assert again == manifest
    fresh = str(tiny_data / "shards-again")
    run_shard(str(tiny_data / "data" / "llava_v1_5_mix665k.json"), str(tiny_data / "data" / "images"), fresh, SHARD_CFG)
    for name, data in before.items():
        if name.endswith(".parquet"):
            assert storage.read_bytes(f"{fresh}/{name}") == data, name


def test_precompute_caches_every_sample_once_with_what_trim_computes_online(cache, shards, tiny_models):
    out, manifest = cache
    rows = list(iter_cache(out))
    # Every sample exactly once, by its position in the mixture (ids repeat, as in LLaVA's file).
    assert len(rows) == len({r["index"] for r in rows}) == shards[1].samples == manifest.samples
    assert len({r["id"] for r in rows}) < len(rows)
    text_only = [r for r in rows if r["image_key"] is None]
    assert text_only and all(r["num_tokens"] == 0 for r in text_only)
    assert manifest.text_only_samples == len(text_only)
    visual = [r for r in rows if r["num_tokens"]]
    assert all(r["num_tokens"] == r["num_kept"] + int(r["has_aggregate"]) for r in visual)
    assert all(len(r["kept_indices"]) == r["num_kept"] for r in visual)
    # One sample recomputed online, as inference would: the same kept patches, the same tokens.
    row = visual[3]
    image_row = next(i for n in storage.listdir(shards[0], ".parquet") if n.startswith("images-")
                     for i in storage.read_parquet(f"{shards[0]}/{n}").to_pylist() if i["image_key"] == row["image_key"])
    import io
    encoder = ClipEncoder(tiny_models.clip)
    feats = encoder.encode_images([Image.open(io.BytesIO(image_row["bytes"]))])
    text = encoder.encode_texts([trim_text(json.loads(row["conversations"]), "conversation")])
    online = trim_tokens(feats.features, feats.patch_embeds, text, TrimConfig())
    assert torch.nonzero(online.keep_mask[0]).flatten().tolist() == row["kept_indices"]
    torch.testing.assert_close(decode_tokens(row).float(), online.tokens[0].half().float())
    np.testing.assert_allclose(decode_scores(row), online.scores[0].numpy(), rtol=1e-2, atol=1e-6)
    assert manifest.kept.mean_share > 0 and manifest.encoder["num_patches"] == 576


def test_precompute_refuses_a_cache_of_another_configuration(cache, shards, tiny_models):
    with pytest.raises(ValueError, match="different configuration.*trim"):
        run_precompute(shards[0], cache[0], str(tiny_models.clip), TrimConfig.paper(), PRECOMPUTE_CFG)


def test_official_preset_groups_micro_batches_with_one_n_each(shards, tiny_data, tiny_models):
    cfg = TrimConfig.official()
    out = str(tiny_data / "cache-official")
    run_precompute(shards[0], out, str(tiny_models.clip), cfg, PRECOMPUTE_CFG)
    # Groups of batch_group_size consecutive samples in mixture order, text-only ones included (they
    # bring the zero image into the group's IQR and get no tokens): one count per group.
    rows = sorted(iter_cache(out), key=lambda r: r["index"])
    groups = [rows[i:i + cfg.batch_group_size] for i in range(0, len(rows), cfg.batch_group_size)]
    assert len(groups) > 2 and any(not r["num_tokens"] for group in groups for r in group)
    for group in groups:
        assert len({r["num_kept"] for r in group if r["num_tokens"]}) <= 1
    assert all(r["num_tokens"] == 0 for r in rows if r["image_key"] is None)


def test_killed_precompute_resumes_with_every_sample_once(shards, tiny_data, tiny_models):
    root = tiny_data
    overrides = [f"paths.root={root}", f"paths.clip={tiny_models.clip}", "precompute.rows_per_file=12",
                 "precompute.batch_size=1", "trim.preset=paper"]
    # The recipe's cache is {root}/cache; use a root whose shards are the fixture's.
    resume_root = root / "resume"
    (resume_root).mkdir()
    os.symlink(shards[0], resume_root / "shards")
    overrides[0] = f"paths.root={resume_root}"
    args = [sys.executable, str(REPO / "jobs" / "precompute.py"), "--recipe", "tiny"]
    for o in overrides:
        args += ["--set", o]
    env = job_env()
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    cache_dir = resume_root / "cache"
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache_dir.glob("part-*.parquet")):
        assert process.poll() is None, "precompute ended before it could be stopped"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = _settled_parts(cache_dir)  # the killed job's workers may finish the part in their hands
    stamps = {name: (cache_dir / name).stat().st_mtime_ns for name in written}
    assert written and not (cache_dir / "manifest.json").exists()
    result = run_job("precompute", *overrides)
    assert f"{len(written)} already written" in result.stdout
    assert {name: (cache_dir / name).stat().st_mtime_ns for name in written} == stamps  # skipped, not redone
    rows = list(iter_cache(str(cache_dir), ["index"]))
    assert len(rows) == len({r["index"] for r in rows}) == shards[1].samples
    assert json.loads((cache_dir / "manifest.json").read_text())["samples"] == shards[1].samples


def _settled_parts(cache_dir, quiet_s=3.0, limit_s=120.0):
    """The parts in cache_dir once no new one has appeared for quiet_s seconds."""
    deadline = time.time() + limit_s
    names = sorted(p.name for p in cache_dir.glob("part-*.parquet"))
    while time.time() < deadline:
        time.sleep(quiet_s)
        again = sorted(p.name for p in cache_dir.glob("part-*.parquet"))
        if again == names:
            return names
        names = again
    raise AssertionError(f"parts still appearing {limit_s:.0f} s after the job was killed")


def test_shard_and_precompute_on_s3(s3_env, tiny_data, tiny_models):
    os.environ.update(s3_env)  # the in-test s3fs client; the jobs get the env explicitly
    # With the run root on S3 the default MLflow store is ./mlflow.db: keep it out of the checkout.
    job_env_s3 = dict(s3_env, MLFLOW_TRACKING_URI=f"sqlite:///{tiny_data}/mlflow-s3.db")
    try:
        fs, _ = storage.fsspec_fs("s3://trim-test/")
        fs.mkdir("trim-test")
        fs.put(str(tiny_data / "data"), "trim-test/run/data", recursive=True)
        overrides = ["paths.root=s3://trim-test/run", f"paths.clip={tiny_models.clip}", "shard.images_per_shard=16",
                     "precompute.rows_per_file=64"]
        shard_out = run_job("shard", *overrides, env=job_env_s3)
        assert "set aside" in shard_out.stdout
        assert "testing" not in shard_out.stdout + shard_out.stderr  # credentials never printed
        run_job("precompute", *overrides, env=job_env_s3)
        manifest = storage.read_json("s3://trim-test/run/cache/manifest.json")
        shards_manifest = storage.read_json("s3://trim-test/run/shards/manifest.json")
        rejects = storage.read_parquet("s3://trim-test/run/shards/rejects.parquet").to_pylist()
        assert {r["id"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
        rows = list(iter_cache("s3://trim-test/run/cache", ["index", "num_tokens"]))
        assert len(rows) == len({r["index"] for r in rows}) == shards_manifest["samples"] == manifest["samples"]
    finally:
        for key in s3_env:
            os.environ.pop(key, None)
