"""Shard and precompute as real Ray Data jobs: locally, killed and resumed, rerun after their inputs
changed (a new version each time, the current one read), and against moto S3."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import storage
from pipelines.cache_format import decode_scores, decode_tokens, iter_cache
from pipelines.config import PrecomputeConfig, ShardConfig
from pipelines.manifests import CURRENT_FILE, MANIFEST_FILE, CacheManifest, ShardsManifest, resolve_output
from pipelines.precompute.stage import run_precompute
from pipelines.shard.stage import run_shard
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
    "bad-empty-reply": "template conflict",
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


def _rows(folder, prefix, manifest):
    """The rows of the files of one kind (samples-, images-) that a shards manifest lists."""
    return [row for name in sorted(manifest.files) if name.startswith(prefix)
            for row in storage.read_parquet(f"{folder}/{name}").to_pylist()]


def test_shard_sets_aside_every_bad_record_by_name_and_loses_nothing(shards, tiny_data):
    root, manifest = shards
    out = resolve_output(root)
    assert out == f"{root}/{manifest.version}"
    records = json.loads((tiny_data / "data" / "llava_v1_5_mix665k.json").read_text())
    rejects = storage.read_parquet(f"{out}/rejects.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
    assert all(r["detail"] for r in rejects)
    samples = _rows(out, "samples-", manifest)
    assert len(samples) + len(rejects) == len(records) == manifest.samples + manifest.rejects
    assert sorted(s["index"] for s in samples) + [] == sorted(set(range(len(records))) - {r["index"] for r in rejects})
    assert manifest.per_reject_reason["malformed conversation"] == 2
    assert sum(manifest.per_source.values()) == len(samples)
    # Images: one row per distinct content, every sample's key among them, bytes intact.
    images = _rows(out, "images-", manifest)
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
    root, manifest = shards
    out = f"{root}/{manifest.version}"
    before = {n: storage.read_bytes(f"{out}/{n}") for n in storage.listdir(out)}
    again = run_shard(str(tiny_data / "data" / "llava_v1_5_mix665k.json"), str(tiny_data / "data" / "images"),
                      root, SHARD_CFG)
    assert again == manifest
    assert {n: storage.read_bytes(f"{out}/{n}") for n in storage.listdir(out)} == before  # nothing rewritten
    fresh = str(tiny_data / "shards-again")
    run_shard(str(tiny_data / "data" / "llava_v1_5_mix665k.json"), str(tiny_data / "data" / "images"), fresh, SHARD_CFG)
    assert set(manifest.files) <= set(before)
    for name in manifest.files:
        if name.endswith(".parquet"):
            assert storage.read_bytes(f"{fresh}/{manifest.version}/{name}") == before[name], name


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
    image_row = next(i for i in _rows(resolve_output(shards[0]), "images-", shards[1])
                     if i["image_key"] == row["image_key"])
    import io
    encoder = ClipEncoder(tiny_models.clip)
    feats = encoder.encode_images([Image.open(io.BytesIO(image_row["bytes"]))])
    text = encoder.encode_texts([trim_text(json.loads(row["conversations"]), "conversation")])
    online = trim_tokens(feats.features, feats.patch_embeds, text, TrimConfig())
    assert torch.nonzero(online.keep_mask[0]).flatten().tolist() == row["kept_indices"]
    torch.testing.assert_close(decode_tokens(row).float(), online.tokens[0].half().float())
    np.testing.assert_allclose(decode_scores(row), online.scores[0].numpy(), rtol=1e-2, atol=1e-6)
    assert manifest.kept.mean_share > 0 and manifest.encoder["num_patches"] == 576


def test_another_configuration_writes_a_new_cache_version_and_the_first_comes_back_without_work(
        cache, shards, tiny_models):
    root, first = cache
    other = run_precompute(shards[0], root, str(tiny_models.clip), TrimConfig.paper(), PRECOMPUTE_CFG)
    assert other.version != first.version and resolve_output(root) == f"{root}/{other.version}"
    assert other.samples == first.samples == len(list(iter_cache(root, ["index"])))
    stamp = os.stat(f"{root}/{first.version}/{MANIFEST_FILE}").st_mtime_ns
    assert run_precompute(shards[0], root, str(tiny_models.clip), TrimConfig(), PRECOMPUTE_CFG) == first
    assert resolve_output(root) == f"{root}/{first.version}"
    assert os.stat(f"{root}/{first.version}/{MANIFEST_FILE}").st_mtime_ns == stamp


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
    cache_root = resume_root / "cache"
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache_root.glob("v-*/part-*.parquet")):
        assert process.poll() is None, "precompute ended before it could be stopped"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (cache_dir,) = cache_root.glob("v-*")
    written = _settled_parts(cache_dir)  # the killed job's workers may finish the part in their hands
    stamps = {name: (cache_dir / name).stat().st_mtime_ns for name in written}
    assert written and not (cache_dir / "manifest.json").exists() and not (cache_root / CURRENT_FILE).exists()
    result = run_job("precompute", *overrides)
    assert f"{len(written)} already written" in result.stdout
    assert {name: (cache_dir / name).stat().st_mtime_ns for name in written} == stamps  # skipped, not redone
    assert resolve_output(str(cache_root)) == str(cache_dir)
    rows = list(iter_cache(str(cache_root), ["index"]))
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
        manifest = CacheManifest.read("s3://trim-test/run/cache")
        shards_manifest = ShardsManifest.read("s3://trim-test/run/shards")
        assert resolve_output("s3://trim-test/run/shards") == f"s3://trim-test/run/shards/{shards_manifest.version}"
        rejects = storage.read_parquet(f"{resolve_output('s3://trim-test/run/shards')}/rejects.parquet").to_pylist()
        assert {r["id"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
        rows = list(iter_cache("s3://trim-test/run/cache", ["index", "num_tokens"]))
        assert len(rows) == len({r["index"] for r in rows}) == shards_manifest.samples == manifest.samples
    finally:
        for key in s3_env:
            os.environ.pop(key, None)


def test_a_shrunk_mixture_is_sharded_and_cached_anew_with_exactly_its_samples(tmp_path, tiny_models, ray_local):
    """A scheduled run after the mixture changed: 250 records, then the first 150. The second run writes
    new versions of the shards and of the cache and makes them current; nothing of the 250 is read."""
    from synthetic.mixture import write_mixture

    mixture = write_mixture(tmp_path / "data", num_samples=250, num_images=30, seed=4)
    records = json.loads(mixture.read_text())
    assert len(records) >= 245
    shards, cache, images, clip = str(tmp_path / "shards"), str(tmp_path / "cache"), str(mixture.parent / "images"), \
        str(tiny_models.clip)
    shard_cfg = ShardConfig(rows_per_shard=40, images_per_shard=8, concurrency=2)
    first = run_shard(str(mixture), images, shards, shard_cfg)
    first_cache = run_precompute(shards, cache, clip, TrimConfig(), PRECOMPUTE_CFG)
    assert first.samples == first_cache.samples == len(records)
    mixture.write_text(json.dumps(records[:150]))
    second = run_shard(str(mixture), images, shards, shard_cfg)
    second_cache = run_precompute(shards, cache, clip, TrimConfig(), PRECOMPUTE_CFG)
    rows = list(iter_cache(cache, ["index", "id"]))
    assert second.samples == second_cache.samples == len(rows) == 150
    assert sorted(r["index"] for r in rows) == list(range(150))
    assert second.version != first.version and second_cache.version != first_cache.version
    assert second_cache.identity["shards"]["version"] == second.version
    assert resolve_output(shards) == f"{shards}/{second.version}"
    assert resolve_output(cache) == f"{cache}/{second_cache.version}"
    # Retention (keep_versions = 2): the first versions stay, complete, and still read as they were.
    assert ShardsManifest.read(f"{shards}/{first.version}").samples == len(records)
    assert len(list(iter_cache(f"{cache}/{first_cache.version}", ["index"]))) == len(records)
    assert storage.read_json(f"{cache}/{CURRENT_FILE}")["history"] == [second_cache.version, first_cache.version]


def test_new_clip_weights_under_the_same_config_give_a_new_cache_version(shards, tmp_path, tiny_models):
    import shutil

    from safetensors.torch import load_file, save_file

    clip = tmp_path / "clip"
    shutil.copytree(tiny_models.clip, clip)
    cache = str(tmp_path / "cache")
    cfg = PrecomputeConfig(batch_size=8, rows_per_file=400)
    before = run_precompute(shards[0], cache, str(clip), TrimConfig(), cfg)
    (weights,) = clip.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(n for n in tensors if "vision_model" in n and "patch_embedding" in n)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})  # config.json untouched
    after = run_precompute(shards[0], cache, str(clip), TrimConfig(), cfg)
    assert after.version != before.version and resolve_output(cache) == f"{cache}/{after.version}"
    assert after.encoder["config_hash"] != before.encoder["config_hash"]
    assert after.samples == before.samples == shards[1].samples

    def tokens(folder):
        return {r["index"]: r["tokens"] for r in iter_cache(folder, ["index", "tokens"]) if r["tokens"]}

    old, new = tokens(f"{cache}/{before.version}"), tokens(cache)
    assert old.keys() == new.keys() and all(old[i] != new[i] for i in old)  # the new weights' tokens


def test_the_shard_job_sets_aside_a_bad_input_corpus_by_name(tmp_path):
    """The real job (its own process and Ray) on a mixture of corpus cases (tests/unit/pipelines/
    test_bad_inputs.py has them all, refusals included): exit 0, every bad record in the rejects table
    with its reason, the mixture file and its id."""
    import pyarrow.parquet as pq

    from tests.unit.pipelines.test_bad_inputs import GOOD, TURNS, _bomb_png, _folder, _loop, _png

    images = _folder(tmp_path / "data")
    bad = {"dotdot": ("../x.png", None, "path outside image root"),
           "pipe": ("bad/pipe.png", os.mkfifo, "not a regular file"),
           "dir": ("bad/dir.jpg", lambda p: p.mkdir(), "not a regular file"),
           "loop": ("bad/loop-a.png", _loop, "unreadable file"),
           "zero": ("bad/zero.png", lambda p: p.write_bytes(b""), "empty file"),
           "text": ("bad/text.png", lambda p: p.write_text("text"), "unreadable image"),
           "strip": ("bad/strip.png", lambda p: _png(p, (1, 30000), "L"), "extreme aspect ratio"),
           "bomb": ("bad/bomb.png", lambda p: _bomb_png(p, 12000, 12000), "image too large")}
    records: list = [dict(GOOD, id=f"good-{i}") for i in range(2)]
    records.append(dict(GOOD, id="latin-1", conversations=[TURNS[0], {"from": "gpt", "value": "MARK"}]))
    for name, (path, make, _) in bad.items():
        if make:
            make(images / path)
        records.append({"id": name, "image": path, "conversations": TURNS})
    records += [{"id": "surrogate", "conversations": [TURNS[0], {"from": "gpt", "value": "\ud800"}]},
                {"id": 1.5, "image": "ok/good.png", "conversations": TURNS},
                {"id": "roles", "image": "ok/good.png", "conversations": [{"from": "user", "value": "<image>\nq"},
                                                                          {"from": "assistant", "value": "a"}]}]
    mixture = tmp_path / "data" / "llava_v1_5_mix665k.json"
    mixture.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode().replace(b"MARK", b"caf\xe9"))  # BOM; latin-1
    result = run_job("shard", f"paths.root={tmp_path}", "shard.concurrency=1")
    assert result.returncode == 0
    (rejects_file,) = (tmp_path / "shards").rglob("rejects.parquet")
    rejects = {r["id"]: r for r in pq.read_table(rejects_file).to_pylist()}
    expected = {name: reason for name, (_, _, reason) in bad.items()} | {
        "latin-1": "invalid UTF-8", "surrogate": "lone surrogate", f"#{len(records) - 2}": "malformed record",
        "roles": "malformed conversation"}
    assert {rid: r["reason"] for rid, r in rejects.items()} == expected
    for rid, reject in rejects.items():
        assert reject["detail"].startswith(f"{mixture} record #{reject['index']} (id {rid!r}): "), reject["detail"]


def test_a_local_copy_of_an_s3_checkpoint_can_leave_the_weights_behind(s3_env, tiny_models, tmp_path):
    """Evaluation's CPU tasks read only a CLIP checkpoint's processor and tokenizer: from S3 they copy
    the files but the weights, and ClipHost loads from that copy."""
    from pipelines.evaluate.inputs import WEIGHT_SUFFIXES
    from trim.encoders import ClipHost

    os.environ.update(s3_env)
    try:
        fs, _ = storage.fsspec_fs("s3://trim-copy/")
        fs.mkdir("trim-copy")
        fs.put(str(tiny_models.clip), "trim-copy/clip", recursive=True)

        def names(directory) -> list[str]:
            return sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if p.is_file())

        full = storage.local_copy("s3://trim-copy/clip")
        light = storage.local_copy("s3://trim-copy/clip", skip_suffixes=WEIGHT_SUFFIXES)
        assert names(full) == names(tiny_models.clip)
        assert names(light) == [n for n in names(full) if not n.endswith(WEIGHT_SUFFIXES)] != names(full)
        assert ClipHost(light).prepare([Image.new("RGB", (40, 30))]).shape[1:] == (3, 336, 336)
    finally:
        for key in s3_env:
            os.environ.pop(key, None)


def test_image_bytes_replaced_under_the_same_size_and_mtime_are_sharded_and_cached_anew(tmp_path, tiny_models,
                                                                                      ray_local):
    """An image's bytes replaced, its size and mtime put back: with the mixture unchanged, and then grown
    by one record, the rerun reads the image again, writes new shards and the cache holds the new pixels'
    tokens. An index whose key for an unchanged stamp is stale (a file system with coarse times) is
    caught by the image writers, and those images are read again: never an endless error."""
    import pyarrow as pa

    from pipelines.shard.image_index import INDEX_FILE

    images = tmp_path / "images"
    images.mkdir()
    for n in range(3):
        Image.new("RGB", (48, 36), (40 * n, 90, 200)).save(images / f"img{n}.bmp")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue."}]
    records = [{"id": f"r{i}", "image": f"img{i % 3}.bmp", "conversations": turns} for i in range(6)]
    mixture = tmp_path / "mix.json"
    mixture.write_text(json.dumps(records))
    shards, cache, clip = str(tmp_path / "shards"), str(tmp_path / "cache"), str(tiny_models.clip)
    cfg = ShardConfig(rows_per_shard=4, images_per_shard=2, concurrency=1)
    first = run_shard(str(mixture), str(images), shards, cfg)
    first_cache = run_precompute(shards, cache, clip, TrimConfig(), PRECOMPUTE_CFG)

    def tokens(folder):
        return {r["index"]: (r["image_key"], r["tokens"]) for r in iter_cache(folder, ["index", "image_key", "tokens"])}

    before = os.stat(images / "img0.bmp")
    Image.new("RGB", (48, 36), (250, 10, 10)).save(images / "img0.bmp")
    os.utime(images / "img0.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(images / "img0.bmp").st_size == before.st_size
    second = run_shard(str(mixture), str(images), shards, cfg)  # the mixture unchanged
    assert second.version != first.version
    second_cache = run_precompute(shards, cache, clip, TrimConfig(), PRECOMPUTE_CFG)
    old, new = tokens(f"{cache}/{first_cache.version}"), tokens(f"{cache}/{second_cache.version}")
    key = __import__("hashlib").sha256((images / "img0.bmp").read_bytes()).hexdigest()
    for index in (0, 3):  # the records of img0.bmp: the new bytes' key and tokens
        assert new[index][0] == key != old[index][0] and new[index][1] != old[index][1]
    assert all(new[i] == old[i] for i in (1, 2, 4, 5))
    # A stale key under an unchanged stamp, planted in the current index; the mixture grown by a record.
    folder = resolve_output(shards)
    index = storage.read_parquet(f"{folder}/{INDEX_FILE}").to_pylist()
    for row in index:
        row["image_key"] = row["image_key"] if row["path"] != "img1.bmp" else "0" * 64
    storage.write_parquet(f"{folder}/{INDEX_FILE}", pa.Table.from_pylist(index))
    mixture.write_text(json.dumps(records + [dict(records[1], id="r6")]))
    third = run_shard(str(mixture), str(images), shards, cfg)
    stored = {r["image_key"] for r in _rows(resolve_output(shards), "images-", third)}
    assert third.samples == 7 and "0" * 64 not in stored
    assert __import__("hashlib").sha256((images / "img1.bmp").read_bytes()).hexdigest() in stored
