"""Precompute's planning: every sample in exactly one work item and one part, keyed by its position in
the mixture (ids repeat in the real 665K file), each image encoded once per item."""

from pipelines.precompute import plan
from trim import TrimConfig


def _samples():
    # LLaVA-Instruct style: three records of one COCO image share its id; ids as ints and strings.
    rows = []
    for index, (sample_id, image) in enumerate([
            ("000000033471", "a"), ("000000033471", "a"), ("000000033471", "a"), ("12", "b"), ("12", None),
            ("7", "c"), ("7", "b"), ("x", None), ("x", None), ("000000033471", "d")]):
        rows.append({"index": index, "id": sample_id, "source": "s", "image_key": image, "conversations": "[]",
                     "text": f"text {index}"})
    return rows


def _placed(items):
    return sorted(s["index"] for item in items for s in item.samples)


def test_every_sample_is_planned_once_even_when_ids_repeat():
    samples = _samples()
    for cfg in (TrimConfig(), TrimConfig.official()):
        for rows_per_file in (1, 3, 100):
            items = plan(samples, ["b", "a", "c", "d"], cfg, rows_per_file)
            assert _placed(items) == list(range(len(samples)))
            parts = sorted({item.part for item in items})
            assert parts == list(range(len(parts)))  # consecutive part numbers


def test_per_sample_iqr_groups_the_samples_of_one_image_in_image_order():
    items = plan(_samples(), ["b", "a", "c", "d"], TrimConfig(), rows_per_file=100)
    images = [{s["image_key"] for s in item.samples} for item in items]
    assert images[:4] == [{"b"}, {"a"}, {"c"}, {"d"}]
    assert [s["index"] for s in items[0].samples] == [3, 6]
    assert all(s["image_key"] is None for item in items[4:] for s in item.samples)


def test_official_groups_consecutive_image_samples_in_mixture_order():
    cfg = TrimConfig.official()
    items = plan(_samples(), ["a", "b", "c", "d"], cfg, rows_per_file=100)
    visual = [[s["index"] for s in item.samples] for item in items if item.samples[0]["image_key"]]
    order = [s["index"] for s in _samples() if s["image_key"]]
    size = cfg.batch_group_size
    assert visual == [order[i:i + size] for i in range(0, len(order), size)]


def test_parts_fill_up_to_rows_per_file_without_splitting_an_item():
    items = plan(_samples(), ["a", "b", "c", "d"], TrimConfig(), rows_per_file=3)
    per_part: dict[int, int] = {}
    for item in items:
        per_part[item.part] = per_part.get(item.part, 0) + len(item.samples)
    assert all(count >= 3 for part, count in per_part.items() if part < max(per_part))
