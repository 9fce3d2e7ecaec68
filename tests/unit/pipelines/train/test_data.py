"""Micro-batches: length grouping and the resumable epoch iterator."""

import numpy as np

from pipelines.train.data import micro_batches, padding_share
from pipelines.train.order import epoch_micro_batches, rank_micro_batches


def _rows(count: int, dropped: frozenset = frozenset()) -> dict[int, dict]:
    rng = np.random.default_rng(0)
    return {k: {"id": str(k), "length": int(rng.integers(5, 300))} for k in range(count) if k not in dropped}


def _reader(rows: dict[int, dict], reads: list[list[int]]):
    def read(samples: list[int]) -> dict[int, dict]:
        reads.append(list(samples))
        return {k: rows[k] for k in samples if k in rows}
    return read


def test_grouped_micro_batches_cut_padding():
    # Padded, each step's samples are sorted before they are cut into its micro-batches: the more
    # micro-batches a step has, the closer their lengths (the steps themselves are random draws).
    rows = _rows(512)
    length = np.array([rows[k]["length"] for k in range(512)], dtype=np.int32)
    image = np.arange(512) % 5 != 0
    def chunks(group, accum):
        order = epoch_micro_batches(length, image, 4, 2, accum, seed=0, epoch=0, group=group)
        return [chunk for _, chunk in micro_batches(order, _reader(rows, []))]
    plain = padding_share(chunks(False, 1))
    assert padding_share(chunks(True, 1)) < 0.75 * plain  # steps of 8 samples: 0.25 against 0.36
    assert padding_share(chunks(True, 4)) < 0.3 * plain  # steps of 32: 0.09


def test_a_resume_reads_exactly_the_rest_of_the_uninterrupted_sequence():
    rows = _rows(300)
    length = np.array([rows[k]["length"] for k in range(300)], dtype=np.int32)
    image = np.arange(300) % 7 != 0
    world = 2
    for rank in range(world):
        order = rank_micro_batches(epoch_micro_batches(length, image, 4, world, 2, seed=1, epoch=3), rank, world)
        whole = list(micro_batches(order, _reader(rows, [])))
        assert [position for position, _ in whole] == list(range(1, len(order) + 1))
        for skip in (1, 5, 8, 17, len(order)):
            reads: list[list[int]] = []
            # a restarted worker recomputes the order from (seed, epoch) alone
            again = rank_micro_batches(epoch_micro_batches(length, image, 4, world, 2, seed=1, epoch=3), rank, world)
            resumed = list(micro_batches(again, _reader(rows, reads), skip=skip))
            assert resumed == whole[skip:]
            skipped = {k for chunk in order[:skip] for k in chunk} - {k for chunk in order[skip:] for k in chunk}
            assert not skipped & {k for r in reads for k in r}  # what was trained on is not read again


def test_reads_are_windows_of_micro_batches_and_a_micro_batch_that_lost_every_sample_is_replaced():
    rows = _rows(64, dropped=frozenset({4, 5, 6, 7}))
    order = [[k, k + 1, k + 2, k + 3] for k in range(0, 64, 4)]
    reads: list[list[int]] = []
    out = list(micro_batches(order, _reader(rows, reads), window=4))
    assert [len(r) for r in reads] == [16, 16, 16, 16]
    assert len(out) == 16 and [r["id"] for r in out[1][1]] == ["0", "1", "2", "3"]  # its neighbour, repeated


def test_positions_count_the_spliced_tokens_and_the_padding_of_padded_and_packed_batches():
    import torch

    from pipelines.train.data import collate, positions
    from trim.conversation import IMAGE_TOKEN_INDEX

    def sample(text, k):
        ids = [1, IMAGE_TOKEN_INDEX] + [5] * (text - 2) if k else [1] + [5] * (text - 1)
        return {"input_ids": ids, "labels": [-100] * len(ids), "visual": torch.zeros(k, 4), "length": text - 1 + k
                if k else text}

    chunk = [sample(10, 20), sample(6, 0), sample(8, 3)]  # spliced lengths 29, 6, 10
    assert positions(collate(chunk, 0)) == (45, 3 * 29)
    real, slots = positions(collate(chunk, 0, packing=True, max_length=64))
    assert real == 45 and slots == 45  # one row, no padding
    real, slots = positions(collate(chunk, 0, packing=True, max_length=30))
    assert real == 45 and slots == 2 * 29  # rows [29] and [6 + 10]


def _cache_part(folder, count: int, dim: int = 8):
    """One cache part of `count` rows (every third text-only), written as precompute writes parts;
    returns (its SampleIndex, each row's visual tokens)."""
    import json

    import pyarrow as pa

    from pipelines.cache_format import CACHE_SCHEMA, write_part
    from pipelines.train.data import SampleIndex

    rng = np.random.default_rng(0)
    image = np.arange(count) % 3 != 0
    visual = [rng.standard_normal((4 if image[k] else 0, dim)).astype(np.float16) for k in range(count)]
    def talk(k):
        question = ("<image>\n" if image[k] else "") + f"what is in picture {k}?"
        return json.dumps([{"from": "human", "value": question}, {"from": "gpt", "value": f"thing {k}"}])
    columns = {"id": [f"s{k}" for k in range(count)], "source": ["test"] * count, "index": list(range(count)),
               "image_key": [f"{k}.jpg" if image[k] else "" for k in range(count)],
               "conversations": [talk(k) for k in range(count)], "num_tokens": [len(v) for v in visual],
               "num_kept": [len(v) for v in visual], "has_aggregate": [False] * count, "token_dim": [dim] * count,
               "tokens": [v.tobytes() for v in visual], "kept_indices": [[]] * count, "scores": [b""] * count}
    write_part(str(folder), "part-00000.parquet", pa.table(columns, schema=CACHE_SCHEMA))
    index = SampleIndex(str(folder), ["part-00000.parquet"], np.zeros(count, np.int32),
                        np.arange(count, dtype=np.int32), np.full(count, 20, np.int32), image)
    return index, visual


def _spoil_row_groups_except(path, keep: set[int]) -> None:
    """Overwrite with zeros the data of every row group of a Parquet file but `keep` (footer kept)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for group in set(range(meta.num_row_groups)) - keep:
        for c in range(meta.num_columns):
            chunk = meta.row_group(group).column(c)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            data[start:start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
    path.write_bytes(bytes(data))


def test_reading_a_few_samples_of_a_part_reads_only_their_row_groups(tmp_path):
    import math

    import pyarrow.parquet as pq
    import pytest

    from pipelines.cache_format import ROW_GROUP_ROWS
    from pipelines.train.data import CacheReader
    from synthetic.tiny_models import build_llm_tokenizer

    build_llm_tokenizer().save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "cache").mkdir()
    index, visual = _cache_part(tmp_path / "cache", 300)
    part = tmp_path / "cache" / "part-00000.parquet"
    assert pq.ParquetFile(part).metadata.num_row_groups == math.ceil(300 / ROW_GROUP_ROWS) > 3
    wanted = [150, 4, 299]
    _spoil_row_groups_except(part, {k // ROW_GROUP_ROWS for k in wanted})
    rows = CacheReader(index, str(tmp_path / "tokenizer"), max_length=64).read(wanted)
    assert sorted(rows) == sorted(wanted)
    for k in wanted:
        assert rows[k]["id"] == f"s{k}" and int(rows[k]["index"]) == k
        assert np.array_equal(rows[k]["visual"].numpy(), visual[k])
    with pytest.raises(OSError):  # the other groups are unreadable now: the reads above never touched them
        CacheReader(index, str(tmp_path / "tokenizer"), max_length=64).read([100])
