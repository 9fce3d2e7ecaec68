"""From cache rows to padded micro-batches: tokenization (a Ray Data map) and the collate (pure).

The cache already holds each sample's reduced visual tokens; here the conversation is tokenized in
the vicuna_v1 template with its visual token count reserved in the length budget, and micro-batches
are formed from a window of samples sorted by length (LLaVA's group-by-length), which cuts padding.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from trim.conversation import tokenize_conversation
from trim.model import Batch, pack_batch, pad_batch

logger = logging.getLogger(__name__)
TOKENIZED_COLUMNS = ("id", "input_ids", "labels", "tokens", "num_tokens", "token_dim", "length")


class Tokenize:
    """Ray Data map_batches callable: cache rows -> input ids, labels and the final sequence length.

    Samples left with nothing to learn after truncation to max_length are dropped, each named in
    the log (LLaVA would train on them with no supervised token at all)."""

    def __init__(self, llm_path: str, max_length: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(llm_path)
        self.max_length = max_length

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in TOKENIZED_COLUMNS}
        for i, conversations in enumerate(batch["conversations"]):
            num_tokens = int(batch["num_tokens"][i])
            tokenized = tokenize_conversation(json.loads(conversations), self.tokenizer, self.max_length, num_tokens)
            if tokenized.num_supervised == 0:
                reason = tokenized.mask_reason or f"no answer left after truncation to {self.max_length} tokens"
                logger.warning("sample %s (position %s) skipped: %s", batch["id"][i], batch["index"][i], reason)
                continue
            visual = num_tokens if tokenized.image_position is not None else 0
            out["id"].append(batch["id"][i])
            out["input_ids"].append(np.asarray(tokenized.input_ids, dtype=np.int32))
            out["labels"].append(np.asarray(tokenized.labels, dtype=np.int32))
            out["tokens"].append(batch["tokens"][i] if visual else b"")
            out["num_tokens"].append(visual)
            out["token_dim"].append(int(batch["token_dim"][i]))
            out["length"].append(len(tokenized.input_ids) - (1 if visual else 0) + visual)
        return out


class RowsCollate(NumpyBatchCollateFn):
    """iter_torch_batches collate: a numpy column batch -> per-sample dicts (see rows_of); the
    micro-batches are padded later, after grouping by length."""

    def __call__(self, batch: dict[str, Any]) -> list[dict]:  # type: ignore[override]  # rows, not tensors
        return rows_of(batch)


def rows_of(batch: dict[str, Any]) -> list[dict]:
    """Column batch (numpy) -> list of per-sample dicts with the visual tokens decoded."""
    rows = []
    for i in range(len(batch["id"])):
        count, dim = int(batch["num_tokens"][i]), int(batch["token_dim"][i])
        visual = (torch.from_numpy(np.frombuffer(batch["tokens"][i], dtype=np.float16).reshape(count, dim).copy())
                  if count else torch.zeros(0, dim, dtype=torch.float16))
        rows.append({"id": batch["id"][i], "input_ids": batch["input_ids"][i], "labels": batch["labels"][i],
                     "visual": visual, "length": int(batch["length"][i])})
    return rows


def group_by_length(rows: list[dict], micro_batch_size: int, seed: int, enabled: bool = True) -> list[list[dict]]:
    """Split a window of rows into micro-batches; with `enabled`, sorted by length first (so each
    micro-batch pads little) and the micro-batches then put in a seeded random order."""
    ordered = sorted(rows, key=lambda r: r["length"]) if enabled else list(rows)
    chunks = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    if enabled:
        random.Random(seed).shuffle(chunks)
    return chunks


def micro_batches(windows: Iterable[list[dict]], micro_batch_size: int, seed: int, epoch: int,
                  group: bool = True, skip: int = 0) -> Iterator[tuple[int, list[dict]]]:
    """One epoch's micro-batches as (1-based position in the epoch, rows): each window of rows is
    grouped by length (seeded by seed, epoch and window), and the first `skip` micro-batches, trained
    on before a resume, are passed over without being yielded."""
    position = 0
    for window_index, rows in enumerate(windows):
        # hash() of a tuple of ints is the same in every process (PYTHONHASHSEED affects only str).
        chunks = group_by_length(rows, micro_batch_size, seed=hash((seed, epoch, window_index)), enabled=group)
        for chunk in chunks:
            position += 1
            if position > skip:
                yield position, chunk


def collate(chunk: list[dict], pad_token_id: int, packing: bool = False, max_length: int | None = None) -> Batch:
    """A micro-batch: packed into rows of up to max_length positions (no padding computed), or one
    right-padded row per sample."""
    return pack_batch(chunk, max_length, pad_token_id) if packing else pad_batch(chunk, pad_token_id)


def positions(batch: Batch) -> tuple[int, int]:
    """(real positions, all positions) the LLM computes for a collated batch once visual tokens are
    spliced in: rows x the longest row. Their difference is the padding the step pays for."""
    texts = batch.attention_mask.sum(dim=1).tolist()
    if batch.position_ids is None:
        per_row = [[k] for k in (v.shape[0] for v in batch.visual)]
    else:  # packed: samples start where a row's position id is 0
        starts = ((batch.position_ids == 0) & (batch.attention_mask == 1)).sum(dim=1).tolist()
        ks, per_row = iter(v.shape[0] for v in batch.visual), []
        per_row = [[next(ks) for _ in range(n)] for n in starts]
    # the placeholder of a sample with an image becomes its k visual tokens
    real = [int(t) + sum(k - 1 for k in row if k) for t, row in zip(texts, per_row)]
    return sum(real), len(real) * max(real)


def padding_share(chunks: list[list[dict]]) -> float:
    """Share of the padded positions that are padding (what grouping by length cuts)."""
    padded = sum(len(c) * max(r["length"] for r in c) for c in chunks)
    real = sum(r["length"] for c in chunks for r in c)
    return 1 - real / padded if padded else 0.0
