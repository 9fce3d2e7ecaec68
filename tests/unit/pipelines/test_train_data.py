"""Micro-batches: length grouping and the resumable epoch iterator."""

from pipelines.train_data import group_by_length, micro_batches, padding_share


def test_group_by_length_cuts_padding_and_keeps_every_row():
    rows = [{"id": str(i), "length": length} for i, length in enumerate([5, 300, 7, 280, 6, 310, 8, 290])]
    grouped = group_by_length(rows, micro_batch_size=2, seed=0)
    plain = group_by_length(rows, micro_batch_size=2, seed=0, enabled=False)
    assert sorted(r["id"] for c in grouped for r in c) == sorted(r["id"] for r in rows)
    assert padding_share(grouped) < 0.05 < padding_share(plain)
    assert group_by_length(rows, 2, seed=0) == grouped


def test_micro_batches_resume_where_they_left_off():
    windows = [[{"id": f"{w}-{i}", "length": (7 * i + w) % 13} for i in range(8)] for w in range(3)]
    whole = list(micro_batches(windows, micro_batch_size=2, seed=1, epoch=0))
    assert [position for position, _ in whole] == list(range(1, 13))
    assert sorted(r["id"] for _, chunk in whole for r in chunk) == sorted(r["id"] for w in windows for r in w)
    resumed = list(micro_batches(windows, micro_batch_size=2, seed=1, epoch=0, skip=5))
    assert resumed == whole[5:]
    other_epoch = [[r["id"] for r in chunk] for _, chunk in micro_batches(windows, 2, seed=1, epoch=1)]
    assert other_epoch != [[r["id"] for r in chunk] for _, chunk in whole]  # each epoch its own order


def test_positions_count_the_spliced_tokens_and_the_padding_of_padded_and_packed_batches():
    import torch

    from pipelines.train_data import collate, positions
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
