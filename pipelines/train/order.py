"""Each epoch's sample order, decided from light columns only (modality and a length estimate per
sample): pure numpy, no Ray, no tokens, so every worker computes the same order on its own.

As LLaVA's group_by_modality_length sampler (haotian-liu/LLaVA llava_trainer.py,
get_modality_length_grouped_indices): a seeded global shuffle per modality, cut into optimizer steps
(workers x accumulation micro-batches, a "mega-batch"), so each step is a random draw of one modality;
the image and text-only steps then shuffled together. Length only decides how a step's samples are
dealt among its micro-batches: packed, with even token totals, as LLaVA's split_to_even_chunks (the
workers wait for the slowest every step); padded, the step sorted by length and cut one micro-batch
after the other (a step's padded cost is set by its longest samples either way, and the cut keeps
each micro-batch's lengths closest). Steps are not pooled across by length (as HF's
LengthGroupedSampler pools 50 batches): a step of only short or only long samples would weigh each
token differently from LLaVA's (the loss is a token mean per micro-batch), and answer length follows
the data source. The partial steps left at the end of each modality close the epoch, apart (every
micro-batch holds one modality).
Micro-batch j of the epoch goes to worker j % world, so a worker's k-th micro-batch is known from
(seed, epoch, k) alone: a resume at TrainState.micro_in_epoch continues exactly the uninterrupted
sequence (under the same rules: order_rules, recorded in each checkpoint).
"""

from __future__ import annotations

import heapq
import math

import numpy as np


def order_rules(group: bool, balance: bool) -> int:
    """The rules an epoch's order follows with these settings, recorded in each checkpoint
    (pipelines.train.identity.run_identity): an epoch continues exactly only under the rules it began
    with. 1: a plain shuffle; 3: steps drawn at random, as LLaVA's, each cut into consecutive
    micro-batches of its sorted samples; 4: as 3, packed steps split with even totals
    (balanced_split). A checkpoint that records 1 or 2 with grouping on, or none, was ordered by rules
    this code no longer follows, so its epoch cannot continue mid-way."""
    if not group:
        return 1
    return 4 if balance else 3


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's order: the same (seed, epoch) gives the same stream everywhere."""
    return np.random.default_rng([seed, epoch])


def length_grouped(indices: np.ndarray, lengths: np.ndarray, micro_batch_size: int, chunks_per_step: int,
                   rng: np.random.Generator, balance: bool = False) -> list[list[list[int]]]:
    """Steps (lists of chunks_per_step micro-batches) of `indices`: shuffled and cut into steps, each
    step's samples sorted by length and cut into consecutive micro-batches or, with `balance`, split
    into micro-batches of even totals (balanced_split). The last step may be short."""
    shuffled = indices[rng.permutation(len(indices))].tolist()
    step_size = micro_batch_size * chunks_per_step
    steps = []
    for start in range(0, len(shuffled), step_size):
        step = sorted(shuffled[start:start + step_size], key=lambda i: int(lengths[i]))
        steps.append(balanced_split(step, lengths, micro_batch_size) if balance else
                     [step[j:j + micro_batch_size] for j in range(0, len(step), micro_batch_size)])
    return steps


def balanced_split(samples: list[int], lengths: np.ndarray, micro_batch_size: int) -> list[list[int]]:
    """One step's samples as its micro-batches, of the sizes consecutive cuts
    would give, with totals as even as a greedy split makes them: longest first, each to the lightest
    micro-batch with room (as LLaVA's split_to_even_chunks). The workers synchronize every step, so a
    packed step lasts as long as its micro-batch of most tokens: consecutive cuts of the sorted samples
    gave the last worker the longest one every step (benchmarks/bench_train.py's TRIM cache,
    micro-batches of 8: 5% over the mean tokens at 2 workers, 8% at 4 and 8; split so, 0.2-0.4%)."""
    count = -(-len(samples) // micro_batch_size)
    room = [micro_batch_size] * (count - 1) + [len(samples) - micro_batch_size * (count - 1)]
    chunks: list[list[int]] = [[] for _ in range(count)]
    open_chunks = [(0, k) for k in range(count)]  # (total so far, micro-batch) of those with room: a heap
    for sample in sorted(samples, key=lambda i: -int(lengths[i])):
        total, k = heapq.heappop(open_chunks)
        chunks[k].append(sample)
        if len(chunks[k]) < room[k]:
            heapq.heappush(open_chunks, (total + int(lengths[sample]), k))
    return chunks


def epoch_micro_batches(lengths: np.ndarray, is_image: np.ndarray, micro_batch_size: int, world: int,
                        grad_accum_steps: int, seed: int, epoch: int, group: bool = True,
                        balance: bool = False) -> list[list[int]]:
    """The epoch's micro-batches (sample numbers) over all workers, in order, padded by repeating its
    first ones to a multiple of `world` (every worker then runs as many). `balance` (for packed
    micro-batches): a step's micro-batches of even token totals. With `group` False: a plain seeded
    shuffle cut into consecutive micro-batches (LLaVA's RandomSampler)."""
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
            steps = length_grouped(np.flatnonzero(mask), lengths, micro_batch_size, chunks_per_step, rng, balance)
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
    cut into micro-batches on their own (a step is a whole number of micro-batches, so only the
    modality's last one is short); the epoch is then padded to a multiple of `world`."""
    per_modality = (image_samples, text_samples) if group else (image_samples + text_samples,)
    chunks = sum(math.ceil(n / micro_batch_size) for n in per_modality)
    return math.ceil(chunks / world)
