"""Precompute without Ray: its units (every sample in exactly one, keyed by its position in the mixture;
ids repeat in the real 665K file), the encoder stage against trim_tokens called directly (per sample,
and `official`'s groups with the zero image of text-only samples), and the stages chained by hand over
real shard files: parts, resume, duplicate ids across parts."""

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from pipelines import storage
from pipelines.cache_format import committed_parts, decode_tokens, iter_cache, part_table
from pipelines.image_store import IMAGE_LAYOUT, images_file
from pipelines.manifests import ShardsManifest
from pipelines.precompute.encode import UnitArrays, batch_grouped, encode_unit, sub_batches
from pipelines.precompute.prepare import prepare_batch
from pipelines.precompute.stage import EncoderActor, summarize
from pipelines.precompute.units import (
    gather_group,
    gather_official_batch,
    official_units,
    split_by_image,
    unit_key_batch,
)
from pipelines.shard.image_index import ImageIndex, write_bucket_batch
from pipelines.shard.records import SAMPLE_SCHEMA
from trim import TrimConfig, trim_tokens
from trim.encoders import ClipEncoder, expand_to_square

# LLaVA-Instruct style: records of one COCO image share its id; ids as ints and strings; text-only rows.
RECORDS = [("000000033471", "a"), ("000000033471", "a"), ("000000033471", "a"), ("12", "b"), ("12", None),
           ("7", "c"), ("7", "b"), ("x", None), ("x", None), ("000000033471", "d"), (12, "e"), ("12", "a"),
           ("y", "f"), ("y", None), ("z", "c"), ("z", "g")]


def _conversation(i):
    return json.dumps([{"from": "human", "value": f"<image>\nWhat is shape {i}?"}, {"from": "gpt", "value": "A disc."}])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards as the shard stage lays them out: samples in two files, images in hash buckets."""
    root = tmp_path_factory.mktemp("precompute")
    images, out = root / "images", root / "shards"
    index = ImageIndex()
    for n, name in enumerate(sorted({image for _, image in RECORDS if image})):
        images.mkdir(exist_ok=True)
        Image.effect_noise((40 + 7 * n, 30 + 5 * n), 30 + n).convert("RGB").save(images / f"{name}.png")
        data = (images / f"{name}.png").read_bytes()
        index.add(f"{name}.png", hashlib.sha256(data).hexdigest(), 1, 1, len(data), "", "")
    buckets = index.buckets(images_per_file=3)
    for bucket in buckets:
        write_bucket_batch({k: [v] for k, v in bucket.items()}, str(images), str(out))
    rows = [{"index": i, "id": str(sample_id), "source": "s", "image_path": f"{image}.png" if image else None,
             "image_key": index.key_of[f"{image}.png"] if image else None,
             "conversations": _conversation(i) if image else json.dumps(
                 [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Hello"}])}
            for i, (sample_id, image) in enumerate(RECORDS)]
    for f, chunk in enumerate((rows[:7], rows[7:])):
        storage.write_parquet(str(out / f"samples-{f:05d}.parquet"), pa.Table.from_pylist(chunk, schema=SAMPLE_SCHEMA))
    files = {"samples-00000.parquet": 7, "samples-00001.parquet": len(rows) - 7} | {
        images_file(b["bucket"]): len(b["keys"]) for b in buckets}
    ShardsManifest(input={}, samples=len(rows), rejects=0, images=len(index.owner), image_bytes=0,
                   image_files=len(buckets), image_layout=IMAGE_LAYOUT, sample_files=2, version="v-000000000001",
                   files=files).write(str(out))
    return str(out)


def _samples(shards):
    return [row for name in storage.listdir(shards, ".parquet") if name.startswith("samples-")
            for row in storage.read_parquet(storage.join(shards, name)).to_pylist()]


def _units(shards, cfg, rows_per_file, done=()):
    """The gathering stage, as the Ray pipeline runs it (groupby by hand)."""
    manifest = ShardsManifest.read(shards)
    if batch_grouped(cfg):
        names = [n for n in storage.listdir(shards, ".parquet") if n.startswith("samples-")]
        rows = [(n, storage.read_parquet(storage.join(shards, n)).num_rows) for n in names]
        units = [u for u in official_units(rows, rows_per_file, cfg.batch_group_size) if u["part"] not in done]
        return [gather_official_batch({"part": [u["part"]], "slices": [u["slices"]]}, shards, cfg.batch_group_size)
                for u in units]
    table = pa.concat_tables(storage.read_parquet(storage.join(shards, n), columns=[
        "index", "id", "source", "image_key", "conversations"]) for n in sorted(storage.listdir(shards, ".parquet"))
        if n.startswith("samples-"))
    keyed = unit_key_batch(table, manifest.image_files, rows_per_file)
    return [gather_group(keyed.filter(pc.equal(keyed.column("unit"), key)), shards, manifest.image_files,
                         rows_per_file, list(done)) for key in sorted(set(keyed.column("unit").to_pylist()))]


def _run(shards, cache, clip, cfg, rows_per_file, batch_size=3, done=()):
    """Gather, prepare and encode by hand: what the Ray pipeline runs, stage by stage."""
    actor = EncoderActor(str(clip), cache, layer=-2, trim_cfg=cfg.to_dict(), batch_size=batch_size, dtype="float32")
    written = []
    for units in _units(shards, cfg, rows_per_file, done):
        if units.num_rows:
            written += actor(prepare_batch(units, str(clip), cfg.text, batch_grouped(cfg)))["part"]
    return written


@pytest.mark.parametrize("cfg", [TrimConfig(), TrimConfig.official()], ids=["per-sample", "official"])
@pytest.mark.parametrize("rows_per_file", [1, 3, 100])
def test_every_sample_lands_in_exactly_one_part_though_ids_repeat(shards, tmp_path, tiny_models, cfg, rows_per_file):
    cache = str(tmp_path / "cache")
    parts = _run(shards, cache, tiny_models.clip, cfg, rows_per_file)
    assert len(parts) == len(set(parts)) == len(committed_parts(cache))
    rows = [r for name in committed_parts(cache) for r in iter_cache_part(cache, name)]
    assert sorted(r["index"] for r in rows) == list(range(len(RECORDS)))
    assert {r["index"]: r["id"] for r in rows} == {i: str(sample_id) for i, (sample_id, _) in enumerate(RECORDS)}
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], set()).add(r["index"])
    assert by_id["000000033471"] == {0, 1, 2, 9} and by_id["12"] == {3, 4, 10, 11}
    if rows_per_file == 1:  # duplicate ids spread over several parts
        part_of = {r["index"]: name for name in committed_parts(cache) for r in iter_cache_part(cache, name)}
        assert len({part_of[i] for i in by_id["000000033471"]}) > 1
    assert all((r["num_tokens"] > 0) == (r["image_key"] is not None) for r in rows)
    info = {"num_patches": 576, "feature_dim": ClipEncoder(tiny_models.clip).feature_dim}
    assert summarize(cache, info, cfg, 0.0).samples == len(RECORDS)


def iter_cache_part(cache, name):
    return storage.read_parquet(storage.join(cache, name)).to_pylist()


def test_per_sample_units_encode_each_distinct_image_once(shards):
    encoded = []
    for table in _units(shards, TrimConfig(), rows_per_file=3):
        for unit in table.to_pylist():
            keys = [s["image_key"] for s in json.loads(unit["samples"]) if s["image_key"]]
            assert keys == sorted(keys)  # the samples of one image together
            distinct = list(dict.fromkeys(keys))
            assert [hashlib.sha256(data).hexdigest() for data in unit["images"]] == distinct
            encoded += distinct
    assert len(encoded) == len(set(encoded)) == len({image for _, image in RECORDS if image})


def test_split_by_image_never_splits_an_images_samples():
    samples = [{"image_key": k, "index": i} for i, k in enumerate("aabbbcaad")]
    runs = split_by_image(samples, rows_per_file=2)
    assert [[s["index"] for s in run] for run in runs] == [[0, 1, 6, 7], [2, 3, 4], [5, 8]]


def test_official_units_are_whole_groups_of_consecutive_samples_in_mixture_order():
    units = official_units([("samples-00000.parquet", 7), ("samples-00001.parquet", 9)], rows_per_file=5, group_size=4)
    slices = [json.loads(u["slices"]) for u in units]
    assert [u["part"] for u in units] == ["part-o00000.parquet", "part-o00001.parquet"]
    assert slices == [[["samples-00000.parquet", 0, 7, 0], ["samples-00001.parquet", 0, 1, 7]],
                      [["samples-00001.parquet", 1, 9, 8]]]


def test_official_groups_hold_text_only_samples_in_mixture_order(shards):
    cfg = TrimConfig.official()
    samples = [s for t in _units(shards, cfg, rows_per_file=5) for u in t.to_pylist() for s in json.loads(u["samples"])]
    assert [s["index"] for s in samples] == list(range(len(RECORDS)))
    assert [s["group"] for s in samples] == [i // cfg.batch_group_size for i in range(len(RECORDS))]
    assert [s["image"] < 0 for s in samples[4:8]] == [True, False, False, True]  # text-only samples inside a group


def test_resume_rewrites_only_the_missing_parts_with_the_same_rows(shards, tmp_path, tiny_models):
    cache = str(tmp_path / "cache")
    _run(shards, cache, tiny_models.clip, TrimConfig(), rows_per_file=3)
    parts = committed_parts(cache)
    before = {name: iter_cache_part(cache, name) for name in parts}
    lost = parts[1::2]
    for name in lost:  # a killed run: some parts never written
        storage.remove(storage.join(cache, name))
    again = _run(shards, cache, tiny_models.clip, TrimConfig(), rows_per_file=3, done=committed_parts(cache))
    assert sorted(again) == sorted(lost)
    assert {name: iter_cache_part(cache, name) for name in committed_parts(cache)} == before


def _unit(rng, images, image_of_sample, groups=None, length=9):
    return UnitArrays(pixels=rng.integers(0, 256, (images, 3, 336, 336), dtype=np.uint8),
                      image_of_sample=np.array(image_of_sample), input_ids=rng.integers(1, 40, (len(image_of_sample), length)),
                      attention_mask=np.ones((len(image_of_sample), length), dtype=np.int64),
                      seeds=np.arange(len(image_of_sample)), groups=None if groups is None else np.array(groups))


def _direct(encoder, unit, rows, cfg):
    """trim_tokens called directly on the rows' features (the zero image for a text-only row)."""
    features, embeds = [], []
    for image in unit.image_of_sample[rows]:
        out = encoder.towers.zero_image() if image < 0 else encoder.towers.encode_levels(
            torch.from_numpy(unit.pixels[image:image + 1].copy()))
        features.append(out.features)
        embeds.append(out.patch_embeds)
    texts = encoder.towers.encode_tokens(torch.from_numpy(unit.input_ids[rows]),
                                         torch.from_numpy(unit.attention_mask[rows]))
    return trim_tokens(torch.cat(features), torch.cat(embeds), texts, cfg, seeds=unit.seeds[rows].tolist())


def _assert_rows_match(reduced, encoder, unit, cfg, groups):
    token_rows = np.concatenate([[0], np.cumsum(reduced.num_tokens)])
    image_row = np.cumsum(reduced.has_image) - 1
    for rows in groups:
        direct = _direct(encoder, unit, np.array(rows), cfg)
        for j, s in enumerate(rows):
            if unit.image_of_sample[s] < 0:
                assert reduced.num_tokens[s] == 0 and not reduced.has_image[s]
                continue
            tokens = torch.from_numpy(reduced.tokens[token_rows[s]:token_rows[s + 1]])
            assert torch.equal(tokens, direct.tokens[j].half())
            assert np.array_equal(reduced.keep[image_row[s]], direct.keep_mask[j].numpy())
            # Scores (diagnostics) may differ in the last fp16 bit: the stage's batched matmuls round
            # differently from a per-sample call; the kept set and tokens above are exact.
            np.testing.assert_allclose(reduced.scores[image_row[s]].astype(np.float32),
                                       direct.scores[j].numpy(), rtol=2e-3, atol=1e-7)
            assert reduced.num_kept[s] == int(direct.num_kept[j])


def test_encoder_stage_matches_trim_tokens_per_sample(tiny_models):
    encoder = ClipEncoder(tiny_models.clip)
    unit = _unit(np.random.default_rng(0), 4, [0, 0, 1, 2, 2, 2, 3])
    reduced = encode_unit(encoder.towers, unit, TrimConfig(), batch_size=2)
    assert reduced.has_image.all() and reduced.tokens.shape[0] == reduced.num_tokens.sum()
    _assert_rows_match(reduced, encoder, unit, TrimConfig(), [[s] for s in range(7)])


def test_official_groups_match_trim_tokens_with_a_zero_image_for_text_only_samples(tiny_models):
    """As released: a text-only sample in a micro-batch brings a zero image into its batch's IQR, and
    its result is discarded; each group of batch_group_size samples gets one count."""
    encoder = ClipEncoder(tiny_models.clip)
    cfg = TrimConfig.official()
    images = [0, -1, 1, 1, 2, -1, -1, 3, 0]
    groups = [i // cfg.batch_group_size for i in range(len(images))]
    unit = _unit(np.random.default_rng(1), 4, images, groups)
    reduced = encode_unit(encoder.towers, unit, cfg, batch_size=3)
    expected = [list(range(i, min(i + 4, len(images)))) for i in range(0, len(images), 4)]
    _assert_rows_match(reduced, encoder, unit, cfg, expected)
    for rows in expected:  # one count per group, whatever the zero images did to it
        assert len({int(reduced.num_kept[s]) for s in rows if images[s] >= 0}) == 1


def test_sub_batches_cut_between_groups_and_bound_the_images():
    assert sub_batches(np.array([0, 0, 1, 2, 3, 3, 4]), None, 2) == [(0, 3), (3, 6), (6, 7)]
    assert sub_batches(np.array([0, 1, 2, 3, -1, 4]), np.array([0, 0, 0, 1, 1, 1]), 2) == [(0, 3), (3, 6)]
    assert sub_batches(np.array([-1, -1]), None, 1) == [(0, 2)]


def test_part_table_round_trips_tokens_scores_and_kept_patches(tiny_models):
    encoder = ClipEncoder(tiny_models.clip)
    unit = _unit(np.random.default_rng(2), 2, [0, -1, 1])
    reduced = encode_unit(encoder.towers, unit, TrimConfig(), batch_size=4)
    meta = [{"id": str(i), "source": "s", "index": i, "image_key": None if image < 0 else f"k{image}",
             "conversations": "[]"} for i, image in enumerate([0, -1, 1])]
    rows = part_table(meta, reduced, encoder.feature_dim).to_pylist()
    assert rows[1]["num_tokens"] == 0 and rows[1]["tokens"] == b"" and rows[1]["kept_indices"] == []
    start = 0
    for row in (rows[0], rows[2]):
        count = row["num_tokens"]
        assert torch.equal(decode_tokens(row), torch.from_numpy(reduced.tokens[start:start + count]))
        assert row["num_tokens"] == row["num_kept"] + int(row["has_aggregate"])
        start += count
    assert rows[0]["kept_indices"] == np.flatnonzero(reduced.keep[0]).tolist()


def test_prepared_pixels_are_the_clip_processors(shards, tiny_models):
    """The CPU stage's 8-bit pixels, normalized on the device, are LLaVA's pixel values bit for bit."""
    table = _units(shards, TrimConfig(), rows_per_file=100)[-1]
    prepared = prepare_batch(table, str(tiny_models.clip), "conversation", False).to_pylist()[0]
    pixels = np.frombuffer(prepared["pixels"], dtype=np.uint8).reshape(prepared["pixel_shape"])
    encoder = ClipEncoder(tiny_models.clip)
    images = [Image.open(io.BytesIO(data)) for data in table.to_pylist()[0]["images"]]
    squared = [expand_to_square(image, encoder.background) for image in images]
    expected = encoder.processor(images=squared, return_tensors="pt")["pixel_values"]
    assert torch.equal(encoder.towers.normalize(torch.from_numpy(pixels.copy())), expected)


# Reading only what a manifest lists; the cache's identity ------------------------------------------


def test_precompute_reads_only_the_samples_files_the_shards_manifest_lists(shards, tmp_path):
    import shutil

    from pipelines.precompute.stage import load_samples

    copy = str(tmp_path / "shards")
    shutil.copytree(shards, copy)
    stale = storage.read_parquet(storage.join(copy, "samples-00000.parquet"))
    storage.write_parquet(storage.join(copy, "samples-00002.parquet"), stale)  # an older attempt's file
    assert sorted(s["index"] for s in load_samples(copy, TrimConfig())) == list(range(len(RECORDS)))
    storage.write_parquet(storage.join(copy, "samples-00001.parquet"), stale)  # a listed file, other rows
    with pytest.raises(ValueError, match="samples-00001.parquet.*9 rows.*holds 7 rows"):
        load_samples(copy, TrimConfig())


def test_the_cache_reader_reads_only_the_listed_parts_and_names_a_changed_one(shards, tmp_path, tiny_models):
    cache = str(tmp_path / "cache" / "v-000000000002")
    _run(shards, cache, tiny_models.clip, TrimConfig(), rows_per_file=3)
    info = {"num_patches": 576, "feature_dim": ClipEncoder(tiny_models.clip).feature_dim}
    manifest = summarize(cache, info, TrimConfig(), 0.0)
    assert manifest.files == {name: len(iter_cache_part(cache, name)) for name in committed_parts(cache)}
    with pytest.raises(FileNotFoundError):  # no manifest yet: not a complete cache
        list(iter_cache(cache))
    manifest.write(cache)
    first = committed_parts(cache)[0]
    storage.write_parquet(storage.join(cache, "part-t09999.parquet"), storage.read_parquet(storage.join(cache, first)))
    assert sorted(r["index"] for r in iter_cache(cache, ["index"])) == list(range(len(RECORDS)))
    storage.remove(storage.join(cache, first))
    with pytest.raises(ValueError, match=f"{first}.*missing"):
        list(iter_cache(cache))


def test_the_cache_identity_covers_weights_dtype_layout_trim_and_the_shards_version(shards, tmp_path, tiny_models):
    import shutil

    from safetensors.torch import load_file, save_file

    from pipelines.config import PrecomputeConfig
    from pipelines.manifests import version_of
    from pipelines.precompute.stage import cache_identity
    from trim.encoders import describe_checkpoint

    manifest = ShardsManifest.read(shards)
    cfg = PrecomputeConfig()

    def version(clip=tiny_models.clip, trim=None, shards_manifest=manifest, **knobs):
        return version_of(cache_identity(describe_checkpoint(clip), trim or TrimConfig(), shards_manifest,
                                         PrecomputeConfig(**{**cfg.__dict__, **knobs})))

    base = version()
    assert version(batch_size=3, concurrency=4, encoder_threads=2, keep_versions=9) == base
    others = [version(dtype="bfloat16"), version(layer=-3), version(rows_per_file=7), version(trim=TrimConfig.paper()),
              version(shards_manifest=ShardsManifest.from_dict({**manifest.to_dict(), "version": "v-000000000009"}))]
    assert base not in others and len(set(others)) == len(others)
    # New weights under the very same config.json: another encoder, another cache.
    clip = tmp_path / "clip"
    shutil.copytree(tiny_models.clip, clip)
    (weights,) = clip.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    assert (clip / "config.json").read_bytes() == (tiny_models.clip / "config.json").read_bytes()
    assert version(clip=clip) != base


# Bounded memory ---------------------------------------------------------------------------------

_WIDE_IMAGES = """
import io, resource, sys
import numpy as np
from PIL import Image
from pipelines.pictures import draw
from pipelines.precompute.prepare import prepare_unit
from trim.encoders import ClipHost

host = ClipHost(sys.argv[1])
pngs = []
for shade in range(5):  # five 18000 x 900 PNGs of a few KB each, as a hostile mixture may hold
    buffer = io.BytesIO()
    Image.new("RGB", (18000, 900), (shade, 80, 160)).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
samples = [{"conversations": '[{"from": "human", "value": "<image>\\\\nq"}, {"from": "gpt", "value": "a"}]'}] * 5
small = io.BytesIO()
Image.new("RGB", (40, 30)).save(small, format="PNG")
prepare_unit(host, samples[:1], [small.getvalue()], "conversation", False)  # tokenizer and processor warm
draw(Image.open(small), np.zeros(576), [0], sys.argv[2] + "/warm.png")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = prepare_unit(host, samples, pngs, "conversation", False)
assert out["pixel_shape"] == [5, 3, 336, 336], out["pixel_shape"]
for n, data in enumerate(pngs):
    draw(Image.open(io.BytesIO(data)), np.zeros(576), [0, 5], sys.argv[2] + f"/{n}.png")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_wide_images_are_prepared_and_drawn_one_at_a_time_without_their_padded_squares(tiny_models, tmp_path):
    """Five 18000 x 900 images: padded to squares at full resolution they would take 1.3 GB each (PIL's
    32-bit pixels); one at a time, in strips, the peak grows by about one decoded image (65 MB)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WIDE_IMAGES, str(tiny_models.clip), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    assert growth < 400 * 2**20, f"peak memory grew by {growth / 2**20:.0f} MiB"
    assert len(list(tmp_path.glob("[0-9].png"))) == 5
