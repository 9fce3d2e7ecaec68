"""From cache rows to micro-batches: which samples (train_order), read from the cache by position,
tokenized in the worker, and the collate (pure).

The driver reads only light columns (modality, a length estimate) into a SampleIndex; each worker
computes the epoch's order from it and reads its own micro-batches' rows WINDOW_MICRO_BATCHES at a
time (bounded memory, the next window read while this one trains), tokenizing them in the vicuna_v1
template with the visual token count reserved in the length budget. No Ray here: the same code runs
in a test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines import storage
from pipelines.train.plan import WINDOW_MICRO_BATCHES
from trim.batching import Batch, pack_batch, pad_batch
from trim.conversation import tokenize_conversation

logger = logging.getLogger(__name__)
TOKENIZED_COLUMNS = ("index", "id", "input_ids", "labels", "tokens", "num_tokens", "token_dim", "length")
READ_COLUMNS = ["index", "id", "conversations", "tokens", "num_tokens", "token_dim"]
CHARS_PER_TOKEN = 4
"""Length estimate of a conversation for grouping (LLaVA groups by a word count, also an estimate)."""


@dataclass
class SampleIndex:
    """Where each sample of the cache lives and what the order needs of it; sample k is the k-th row
    of the parts in name order. A few bytes a sample: 665K samples are about 7 MB."""

    folder: str
    """The cache version folder."""
    parts: list[str]
    """Part file names, sorted."""
    part: np.ndarray
    """int32 [samples]: the sample's part (position in `parts`)."""
    row: np.ndarray
    """int32 [samples]: its row in that part."""
    length: np.ndarray
    """int32 [samples]: estimated sequence length (visual tokens + conversation characters / 4)."""
    is_image: np.ndarray
    """bool [samples]: the sample has visual tokens."""

    def __len__(self) -> int:
        return len(self.part)


def sample_index(cache: str) -> SampleIndex:
    """The SampleIndex of the complete cache at `cache` (a root or a version folder), from the light
    columns of the parts its manifest lists (the visual tokens are not read)."""
    from pipelines.cache_format import cache_files

    folder, files = cache_files(cache)
    parts = sorted(files)
    part, row, length, image = [], [], [], []
    for number, name in enumerate(parts):
        table = storage.read_parquet(storage.join(folder, name), columns=["num_tokens", "conversations"])
        visual = table.column("num_tokens").to_numpy().astype(np.int32)
        chars = pc.utf8_length(table.column("conversations")).to_numpy().astype(np.int32)
        part.append(np.full(len(visual), number, dtype=np.int32))
        row.append(np.arange(len(visual), dtype=np.int32))
        length.append(visual + chars // CHARS_PER_TOKEN)
        image.append(visual > 0)
    def joined(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return SampleIndex(folder, parts, joined(part, np.int32), joined(row, np.int32), joined(length, np.int32),
                       joined(image, bool))


class Tokenize:
    """Cache rows (a numpy column batch) -> input ids, labels and the final sequence length.

    Samples left with nothing to learn after truncation to max_length are dropped, each named in
    the log (LLaVA would train on them with no supervised token at all)."""

    def __init__(self, llm_path: str, max_length: int):
        from trim.llm_tokenizer import load_llm_tokenizer

        self.tokenizer = load_llm_tokenizer(llm_path)
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
            out["index"].append(int(batch["index"][i]))
            out["id"].append(batch["id"][i])
            out["input_ids"].append(np.asarray(tokenized.input_ids, dtype=np.int32))
            out["labels"].append(np.asarray(tokenized.labels, dtype=np.int32))
            out["tokens"].append(batch["tokens"][i] if visual else b"")
            out["num_tokens"].append(visual)
            out["token_dim"].append(int(batch["token_dim"][i]))
            out["length"].append(len(tokenized.input_ids) - (1 if visual else 0) + visual)
        return out


def rows_of(batch: dict[str, Any]) -> list[dict]:
    """Tokenized column batch -> list of per-sample dicts with the visual tokens decoded."""
    rows = []
    for i in range(len(batch["id"])):
        count, dim = int(batch["num_tokens"][i]), int(batch["token_dim"][i])
        visual = (torch.from_numpy(np.frombuffer(batch["tokens"][i], dtype=np.float16).reshape(count, dim).copy())
                  if count else torch.zeros(0, dim, dtype=torch.float16))
        rows.append({"index": batch["index"][i], "id": batch["id"][i], "input_ids": batch["input_ids"][i],
                     "labels": batch["labels"][i], "visual": visual, "length": int(batch["length"][i])})
    return rows


class CacheReader:
    """Reads samples of the cache by number (SampleIndex order) and tokenizes them; `memo` keeps every
    sample read in memory (tokenized once for all epochs: small caches and benchmarks)."""

    def __init__(self, index: SampleIndex, llm_path: str, max_length: int, memo: bool = False):
        self.index, self.memo = index, memo
        self.tokenize = Tokenize(llm_path, max_length)
        self.fs, self.path = storage.arrow_fs(index.folder)
        self.group_starts: dict[int, np.ndarray] = {}  # part -> first row of each row group, then its rows
        self.kept: dict[int, dict | None] = {}

    def _read_part(self, part: int, rows: np.ndarray) -> pa.Table:
        """Rows `rows` of a part, in that order, reading only the row groups that hold them (a part is
        written in small row groups, cache_format.ROW_GROUP_ROWS, as a row costs its whole group)."""
        with self.fs.open_input_file(storage.join(self.path, self.index.parts[part])) as source:
            handle = pq.ParquetFile(source, pre_buffer=True)  # one coalesced read for the groups, not one per chunk
            if part not in self.group_starts:
                sizes = [handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)]
                self.group_starts[part] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            starts = self.group_starts[part]
            groups = np.searchsorted(starts, rows, side="right") - 1
            needed = np.unique(groups)
            # where each needed group begins in the table of the needed groups alone
            offsets = np.concatenate([[0], np.cumsum(starts[needed + 1] - starts[needed])])
            table = handle.read_row_groups(needed.tolist(), columns=READ_COLUMNS)
        local = offsets[np.searchsorted(needed, groups)] + rows - starts[groups]
        return table.take(pa.array(local))

    def _read_raw(self, samples: Sequence[int]) -> tuple[pa.Table, np.ndarray]:
        """The cache rows of `samples` and their sample numbers, grouped by part."""
        wanted = np.asarray(samples, dtype=np.int64)
        tables, order = [], []
        for part in np.unique(self.index.part[wanted]):
            mine = wanted[self.index.part[wanted] == part]
            tables.append(self._read_part(int(part), self.index.row[mine].astype(np.int64)))
            order.append(mine)
        return pa.concat_tables(tables), np.concatenate(order)

    def read(self, samples: Sequence[int]) -> dict[int, dict]:
        """Sample number -> tokenized row; a sample Tokenize drops (nothing to learn) is absent."""
        wanted = [k for k in dict.fromkeys(samples) if k not in self.kept]
        if wanted:
            table, numbers = self._read_raw(wanted)
            by_index = {int(i): int(k) for i, k in zip(table.column("index").to_numpy(), numbers)}
            batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in READ_COLUMNS}
            fresh: dict[int, dict | None] = dict.fromkeys(wanted)
            fresh.update({by_index[int(r["index"])]: r for r in rows_of(self.tokenize(batch))})
        else:
            fresh = {}
        if self.memo:
            self.kept.update(fresh)
        found = {**{k: self.kept[k] for k in samples if k in self.kept}, **fresh}
        return {k: row for k, row in found.items() if row is not None}


def micro_batches(order: list[list[int]], read: Callable[[list[int]], dict[int, dict]], skip: int = 0,
                  window: int = WINDOW_MICRO_BATCHES) -> Iterator[tuple[int, list[dict]]]:
    """One worker's micro-batches of an epoch as (1-based position in the epoch, rows), from its order
    (train_order.rank_micro_batches); the first `skip`, trained on before a resume, are not read. Rows
    are read `window` micro-batches at a time, the next window while this one is trained on. A
    micro-batch whose every sample was dropped by Tokenize is replaced by a neighbour (workers must run
    the same number of steps)."""
    pending = order[skip:]
    windows = [pending[i:i + window] for i in range(0, len(pending), window)]

    def fetch(group: list[list[int]]) -> list[list[dict]]:
        rows = read([k for chunk in group for k in chunk])
        return [[rows[k] for k in chunk if k in rows] for chunk in group]

    position, last = skip, None
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(fetch, windows[0]) if windows else None
        for number in range(len(windows)):
            assert upcoming is not None
            chunks = upcoming.result()
            upcoming = pool.submit(fetch, windows[number + 1]) if number + 1 < len(windows) else None
            for chunk in chunks:
                position += 1
                if not chunk:
                    chunk = last or next((c for c in chunks if c), [])
                    if not chunk:
                        raise RuntimeError(f"finetune: no sample of micro-batches {position}.. is left after "
                                           "tokenization (see the warnings above)")
                    logger.warning("micro-batch %d lost every sample to truncation; repeating a neighbour", position)
                last = chunk
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
