"""Each epoch's sample order, decided from light columns only (modality and a length estimate per
sample): pure numpy, no Ray, no tokens, so every worker computes the same order on its own.

In the manner of LLaVA's group_by_modality_length sampler (haotian-liu/LLaVA llava_trainer.py): a
seeded global shuffle per modality, each optimizer step's micro-batches (workers x accumulation of
them) all of one modality, the image and text-only steps then shuffled together. The length grouping is
that of HF's LengthGroupedSampler (samples sorted by length in pools of several steps, cut into
consecutive micro-batches), which cuts padding where LLaVA's per-step split balances lengths across
workers but mixes them inside a micro-batch; a step's micro-batches still come from neighbouring
lengths, so the workers stay balanced. The partial steps left at the end of each modality close the
epoch, apart (every micro-batch holds one modality). Micro-batch j of the epoch goes to worker
j % world, so a worker's k-th micro-batch is known from (seed, epoch, k) alone: a resume at
TrainState.micro_in_epoch continues exactly the uninterrupted sequence.
"""

from __future__ import annotations

import math

import numpy as np

POOL_STEPS = 8
"""Steps' worth of samples sorted by length together (HF's LengthGroupedSampler sorts 50 batches)."""


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's order: the same (seed, epoch) gives the same stream everywhere."""
    return np.random.default_rng([seed, epoch])


def length_grouped(indices: np.ndarray, lengths: np.ndarray, micro_batch_size: int, chunks_per_step: int,
                   rng: np.random.Generator) -> list[list[list[int]]]:
    """Steps (lists of chunks_per_step micro-batches) of `indices`, shuffled: pools of POOL_STEPS
    steps' samples sorted by length, cut into consecutive micro-batches (similar lengths inside, so
    little padding) and those into steps (similar lengths across a step's workers). The last step may
    be short."""
    shuffled = indices[rng.permutation(len(indices))].tolist()
    pool = micro_batch_size * chunks_per_step * POOL_STEPS
    steps = []
    for start in range(0, len(shuffled), pool):
        ordered = sorted(shuffled[start:start + pool], key=lambda i: int(lengths[i]))
        chunks = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
        steps += [chunks[i:i + chunks_per_step] for i in range(0, len(chunks), chunks_per_step)]
    return steps


def epoch_micro_batches(lengths: np.ndarray, is_image: np.ndarray, micro_batch_size: int, world: int,
                        grad_accum_steps: int, seed: int, epoch: int, group: bool = True) -> list[list[int]]:
    """The epoch's micro-batches (sample numbers) over all workers, in order, padded by repeating its
    first ones to a multiple of `world` (every worker then runs as many). With `group` False: a plain
    seeded shuffle cut into consecutive micro-batches (LLaVA's RandomSampler)."""
    rng = epoch_rng(seed, epoch)
    count = len(lengths)
    if not group:
        order = rng.permutation(count).tolist()
        batches = [order[i:i + micro_batch_size] for i in range(0, count, micro_batch_size)]
    else:
        chunks_per_step = world * grad_accum_steps
        full: list[list[list[int]]] = []
        partial: list[list[list[int]]] = []
        for mask in (is_image, ~is_image):  # one modality per mega-batch
            steps = length_grouped(np.flatnonzero(mask), lengths, micro_batch_size, chunks_per_step, rng)
            if steps and sum(len(c) for c in steps[-1]) < micro_batch_size * chunks_per_step:
                partial.append(steps.pop())
            full += steps
        batches = [chunk for k in rng.permutation(len(full)) for chunk in full[k]]
        batches += [chunk for step in partial for chunk in step]
    if batches and len(batches) % world:
        batches += [batches[i % len(batches)] for i in range(world - len(batches) % world)]
    return batches


def rank_micro_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Worker `rank`'s share of an epoch's micro-batches, in its order: the micro-batches of one step
    (world x accumulation of them) go one per worker per accumulation step, as LLaVA's data loader
    deals them."""
    return batches[rank::world]


def micro_batches_per_rank(image_samples: int, text_samples: int, micro_batch_size: int, world: int,
                           group: bool = True) -> int:
    """How many micro-batches each worker runs an epoch (the same for every epoch and seed), without
    building the order: len(epoch_micro_batches(...)) // world. Grouped, each modality's samples are
    cut into micro-batches on their own (a length pool is a whole number of micro-batches, so only the
    modality's last one is short); the epoch is then padded to a multiple of `world`."""
    per_modality = (image_samples, text_samples) if group else (image_samples + text_samples,)
    chunks = sum(math.ceil(n / micro_batch_size) for n in per_modality)
    return math.ceil(chunks / world)
