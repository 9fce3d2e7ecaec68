"""Micro-batches of tokenized samples with their reduced visual tokens, and where each position of the
LLM's input comes from once the visual tokens are spliced in.

A micro-batch is either padded (one sample per row, `pad_batch`) or packed (several samples back to
back in a row, `pack_batch`): a packed batch carries position ids that restart at 0 for each sample,
and no 2D attention mask goes to the LLM, so transformers confines attention to each sample
(`create_causal_mask` derives the block-diagonal causal mask from the position ids for eager, sdpa
and flex attention; flash attention reads them as varlen boundaries in a single row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trim.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class Batch:
    """A micro-batch, as the collator makes it: padded (one sample per row) or packed (several)."""

    input_ids: torch.Tensor
    """[R, T] token ids with at most one IMAGE_TOKEN_INDEX per sample, right-padded."""
    labels: torch.Tensor
    """[R, T] IGNORE_INDEX where no loss is taken (prompt, padding)."""
    attention_mask: torch.Tensor
    """[R, T] 1 on real tokens (each row's real tokens first, then its padding)."""
    visual: list[torch.Tensor]
    """One tensor [k_i, D] per sample, in the order the samples appear (row by row): its reduced
    visual tokens (k_i = 0 for text-only samples). In a padded batch sample i is row i."""
    position_ids: torch.Tensor | None = None
    """[R, T] packed batches only: each token's position within its own sample, 0 at each sample's
    first token (that is where a sample starts); None for a padded batch."""


@dataclass
class Spliced:
    """The LLM's input for a Batch: placeholders replaced by projected visual tokens."""

    embeds: torch.Tensor
    """[R, W, H] inputs_embeds; zeros on padding."""
    attention_mask: torch.Tensor
    """[R, W] 1 on real positions."""
    labels: torch.Tensor
    """[R, W] IGNORE_INDEX on visual tokens, padding and each sample's first position."""
    position_ids: torch.Tensor | None
    """[R, W] restarting at 0 per sample (padding counts as one more sequence); None if padded."""


def spliced_length(sample: dict) -> int:
    """Positions a sample takes after splicing: its ids, with the placeholder replaced by k visual tokens."""
    n = len(sample["input_ids"])
    return n - 1 + int(sample["visual"].shape[0]) if IMAGE_TOKEN_INDEX in sample["input_ids"] else n


@dataclass
class SpliceLayout:
    """Where each spliced position comes from, worked out on the CPU."""

    index: torch.Tensor
    """[R, W] row of cat([text embeddings flattened, projected visual tokens, one zero row])."""
    labels: torch.Tensor
    """[R, W]"""
    mask: torch.Tensor
    """[R, W]"""
    position_ids: torch.Tensor
    """[R, W] restarting at 0 per sample; the padding of a row counts as one more sequence."""


def _segments(batch: Batch, lengths: list[int]) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its samples in input-id space."""
    if batch.position_ids is None:
        return [[(0, n)] for n in lengths]
    spans = []
    for row, n in zip(batch.position_ids.cpu().tolist(), lengths):
        starts = [t for t in range(n) if row[t] == 0]
        spans.append(list(zip(starts, starts[1:] + [n])))
    return spans


def splice_layout(batch: Batch) -> SpliceLayout:
    """Where each position of the spliced batch comes from, worked out on the CPU (LlavaTrim.embed)."""
    ids, labels = batch.input_ids.cpu(), batch.labels.cpu()
    rows, width = ids.shape
    counts = [int(v.shape[0]) for v in batch.visual]
    offsets = [rows * width + sum(counts[:i]) for i in range(len(counts) + 1)]  # sample i's projected rows
    spans = _segments(batch, batch.attention_mask.sum(dim=1).cpu().tolist())
    if sum(len(s) for s in spans) != len(counts):
        raise ValueError(f"{len(counts)} visual entries for {sum(len(s) for s in spans)} samples")
    out: list[tuple[list[int], list[int], list[int]]] = []
    sample = 0
    for r, row_spans in enumerate(spans):
        row_ids, row_labels = ids[r].tolist(), labels[r].tolist()
        index: list[int] = []
        label: list[int] = []
        position: list[int] = []
        for start, end in row_spans:
            p = row_ids.index(IMAGE_TOKEN_INDEX, start, end) if IMAGE_TOKEN_INDEX in row_ids[start:end] else end
            visual = range(offsets[sample], offsets[sample + 1]) if p < end else range(0)
            first = len(index)
            index += [*range(r * width + start, r * width + p), *visual, *range(r * width + p + 1, r * width + end)]
            label += [*row_labels[start:p], *[IGNORE_INDEX] * len(visual), *row_labels[p + 1:end]]
            if len(index) > first:
                # The shifted loss predicts position j from j-1: a sample's first label would be
                # predicted from the previous sample's last token. Never a target.
                label[first] = IGNORE_INDEX
            position += range(len(index) - first)
            sample += 1
        out.append((index, label, position))
    spliced_width = max(len(index) for index, _, _ in out)
    layout = SpliceLayout(index=torch.full((rows, spliced_width), offsets[-1], dtype=torch.long),  # the zero row
                     labels=torch.full((rows, spliced_width), IGNORE_INDEX, dtype=labels.dtype),
                     mask=torch.zeros((rows, spliced_width), dtype=torch.long),
                     position_ids=torch.zeros((rows, spliced_width), dtype=torch.long))
    for r, (index, label, position) in enumerate(out):
        n = len(index)
        layout.index[r, :n] = torch.tensor(index, dtype=torch.long)
        layout.labels[r, :n] = torch.tensor(label, dtype=labels.dtype)
        layout.mask[r, :n] = 1
        layout.position_ids[r, :n] = torch.tensor(position, dtype=torch.long)
        layout.position_ids[r, n:] = torch.arange(spliced_width - n)
    return layout


def pad_batch(samples: Sequence[dict], pad_token_id: int) -> Batch:
    """Right-pad tokenized samples ({input_ids, labels, visual}) into a Batch, one sample per row."""
    return _rows([[s] for s in samples], pad_token_id, packed=False)


def pack_batch(samples: Sequence[dict], max_length: int | None, pad_token_id: int) -> Batch:
    """Pack tokenized samples back to back into as few rows as hold them, each row at most
    `max_length` spliced positions (visual tokens count; None: one row), lengths balanced across rows
    to keep the padding small. A sample longer than max_length gets a row of its own."""
    lengths = [spliced_length(s) for s in samples]
    limit = max_length or sum(lengths)
    rows: list[list[int]] = [[] for _ in range(max(1, math.ceil(sum(lengths) / limit)))]
    filled = [0] * len(rows)
    for i in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if filled[r] + lengths[i] <= limit or not rows[r]]
        if not fits:
            rows.append([])
            filled.append(0)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda r: filled[r])
        rows[r].append(i)
        filled[r] += lengths[i]
    groups = [[samples[i] for i in sorted(row)] for row in rows if row]
    return _rows(groups, pad_token_id, packed=True)


def _rows(groups: Sequence[Sequence[dict]], pad_token_id: int, packed: bool) -> Batch:
    width = max(sum(len(s["input_ids"]) for s in group) for group in groups)
    ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    for r, group in enumerate(groups):
        t = 0
        for s in group:
            n = len(s["input_ids"])
            ids[r, t:t + n] = torch.tensor(s["input_ids"], dtype=torch.long)
            labels[r, t:t + n] = torch.tensor(s.get("labels", [IGNORE_INDEX] * n), dtype=torch.long)
            positions[r, t:t + n] = torch.arange(n)
            t += n
        mask[r, :t] = 1
        positions[r, t:] = torch.arange(width - t)
    visual = [s["visual"] for group in groups for s in group]
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, visual=visual,
                 position_ids=positions if packed else None)
