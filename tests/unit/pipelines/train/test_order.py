"""Each epoch's order: a seeded global shuffle with LLaVA's modality and length grouping."""

from collections import Counter

import numpy as np

from pipelines.train.order import epoch_micro_batches, micro_batches_per_rank, rank_micro_batches
from synthetic.mixture import SOURCES


def mixture(scale: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, is_image, length) rows in file order: each source's rows together, as the cache's
    parts hold them; scale x LLaVA's shares (in thousands) rows per source."""
    rng = np.random.default_rng(seed)
    source, image, length = [], [], []
    for name, share, folder in SOURCES:
        count = share * scale
        source += [name] * count
        image += [folder is not None] * count
        base = 100 if folder is None else 140  # visual tokens lengthen image samples
        length += list(base + rng.integers(10, 400, count))
    return np.array(source), np.array(image), np.array(length, dtype=np.int32)


def test_the_first_64_samples_mix_the_sources_in_about_their_proportions():
    source, image, length = mixture()
    batches = epoch_micro_batches(length, image, micro_batch_size=4, world=2, grad_accum_steps=2, seed=0, epoch=0)
    first = [k for chunk in batches for k in chunk][:64]
    seen = Counter(source[first])
    assert len(seen) >= 6  # file order would show one source (llava_instruct) only
    # the commonest source (llava_instruct, 24% of the mixture) is neither absent nor everything
    assert 4 <= seen["llava_instruct"] <= 32
    # over the first 1024 every image source is within a loose band around its share of the image
    # samples (text-only ones come in whole mega-batches of their own, as in LLaVA)
    head = [k for chunk in batches for k in chunk][:1024]
    images = Counter(source[[k for k in head if image[k]]])
    total = sum(share for _, share, folder in SOURCES if folder)
    for name, share, folder in SOURCES:
        if folder:
            expected = sum(images.values()) * share / total
            assert 0.5 * expected <= images[name] <= 1.6 * expected + 4, (name, images[name], expected)


def test_micro_batches_hold_one_modality_and_a_steps_are_cut_from_its_sorted_samples():
    source, image, length = mixture()
    batches = epoch_micro_batches(length, image, micro_batch_size=4, world=2, grad_accum_steps=1, seed=3, epoch=0)
    assert all(len(set(image[chunk])) == 1 for chunk in batches)
    assert sorted(k for chunk in batches for k in chunk)[:len(length)] == list(range(len(length)))
    # padded: a step's samples sorted by length, cut one micro-batch after the other (least padding)
    for start in range(0, len(batches) - 1, 2):
        first, second = batches[start], batches[start + 1]
        if len(first) == len(second) == 4:
            assert max(length[first]) <= min(length[second])
    # image and text-only steps are interleaved over the epoch, not all text-only at the end
    text_steps = [i for i, chunk in enumerate(batches) if not image[chunk[0]]]
    assert text_steps[0] < len(batches) // 4


def test_each_epoch_its_own_order_and_the_same_seed_the_same_order():
    _, image, length = mixture(scale=2)
    order = epoch_micro_batches(length, image, 4, 2, 2, seed=7, epoch=0)
    assert order == epoch_micro_batches(length, image, 4, 2, 2, seed=7, epoch=0)
    assert order != epoch_micro_batches(length, image, 4, 2, 2, seed=7, epoch=1)
    assert order != epoch_micro_batches(length, image, 4, 2, 2, seed=8, epoch=0)


def test_every_worker_runs_as_many_micro_batches_and_together_they_cover_the_epoch():
    _, image, length = mixture(scale=1, seed=2)  # 664 samples: the partial mega-batches do not divide
    world = 3
    batches = epoch_micro_batches(length, image, 4, world, 2, seed=0, epoch=4)
    shares = [rank_micro_batches(batches, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) == micro_batches_per_rank(int(image.sum()), int((~image).sum()), 4, world)
    assert {k for s in shares for chunk in s for k in chunk} == set(range(len(length)))


def test_each_step_is_a_random_draw_not_a_band_of_lengths():
    # LLaVA's mega-batches are random draws of one modality, sorted only within: a mixture of 60% short
    # and 40% long samples (answer length follows the source) gives steps of both, not steps of one band
    # (pools of several steps sorted together made 87% of the steps all-short or all-long).
    rng = np.random.default_rng(0)
    count = 4000
    long = rng.random(count) < 0.4
    length = np.where(long, rng.integers(250, 700, count), rng.integers(40, 80, count)).astype(np.int32)
    image = np.ones(count, dtype=bool)
    for balance in (False, True):
        batches = epoch_micro_batches(length, image, 4, world=4, grad_accum_steps=1, seed=0, epoch=0, balance=balance)
        steps = [sum(batches[k:k + 4], []) for k in range(0, len(batches) - 3, 4)]
        shares = np.array([np.mean(long[step]) for step in steps if len(step) == 16])
        assert np.mean((shares == 0) | (shares == 1)) < 0.02  # 16 draws: all one band ~0.03% of the time
        assert abs(np.mean(shares) - 0.4) < 0.03 and 0.08 < np.std(shares) < 0.16  # binomial: 0.12


def test_the_planned_count_is_the_orders_for_any_geometry():
    rng = np.random.default_rng(1)
    for _ in range(40):
        images, texts = int(rng.integers(0, 90)), int(rng.integers(0, 30))
        micro, world, accum = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
        image = np.arange(images + texts) < images
        length = rng.integers(10, 500, images + texts).astype(np.int32)
        for group, balance in ((True, False), (True, True), (False, False)):
            batches = epoch_micro_batches(length, image, micro, world, accum, seed=0, epoch=0, group=group,
                                          balance=balance)
            assert len(batches) == world * micro_batches_per_rank(images, texts, micro, world, group), (
                images, texts, micro, world, accum, group, balance)
            assert {k for chunk in batches for k in chunk} == set(range(images + texts))


def test_packed_a_steps_micro_batches_carry_even_token_totals_so_no_worker_waits_on_another():
    # Every worker waits for the slowest at each step: cut from the sorted samples one after the other,
    # the last micro-batch of a step was always the longest (8% over the mean at 8 workers here).
    _, image, length = mixture(scale=4, seed=5)
    for world, accum in ((2, 1), (8, 1), (4, 2)):
        batches = epoch_micro_batches(length, image, 8, world, accum, seed=0, epoch=1, balance=True)
        per_step = world * accum
        excess = []
        for start in range(0, len(batches) - per_step + 1, per_step):
            step = batches[start:start + per_step]
            if all(len(chunk) == 8 for chunk in step):  # the whole steps (the partial ones close the epoch)
                totals = [int(length[chunk].sum()) for chunk in step]
                excess.append(max(totals) / np.mean(totals) - 1)
        assert len(excess) > 10 and np.mean(excess) < 0.01, (world, accum, np.mean(excess))
        # the sizes are those of consecutive cuts: whole micro-batches, then one short one per modality
        assert sum(len(chunk) < 8 for chunk in batches) <= 2


def test_a_partial_step_keeps_the_sizes_of_consecutive_cuts():
    length = np.arange(10, 30, dtype=np.int32)  # 20 samples, micro-batches of 8: 8, 8 and 4
    batches = epoch_micro_batches(length, np.ones(20, dtype=bool), 8, world=4, grad_accum_steps=1, seed=0, epoch=0,
                                  balance=True)
    assert [len(chunk) for chunk in batches[:3]] == [8, 8, 4]
    assert sorted(k for chunk in batches[:3] for k in chunk) == list(range(20))
