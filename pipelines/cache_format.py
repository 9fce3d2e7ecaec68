"""The TRIM cache's row format, in one place for its writer (precompute) and its readers (training,
pictures, benchmarks): the Parquet schema, a part's table built from the encoder's host arrays,
tensors to and from bytes, and reading the parts. Readers read a complete cache: the parts its
manifest lists (the current version of a cache root, or a version folder given directly), each
checked for its rows; the writer's view of an unfinished version is committed_parts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines import storage
from pipelines.reduced_rows import ReducedRows

CACHE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("index", pa.int64()),
    ("image_key", pa.string()),
    ("conversations", pa.string()),
    ("num_tokens", pa.int32()),       # visual tokens fed to the projector: kept + aggregate (0: text-only)
    ("num_kept", pa.int32()),         # patches kept, aggregate not counted
    ("has_aggregate", pa.bool_()),
    ("token_dim", pa.int32()),
    ("tokens", pa.binary()),          # fp16 [num_tokens, token_dim], row-major
    ("kept_indices", pa.list_(pa.int16())),
    ("scores", pa.binary()),          # fp16 [num_patches]: the softmax values thresholded
])
META_COLUMNS = ("id", "source", "index", "image_key", "conversations")
"""The sample's own fields, copied from the shards."""
PART_PREFIX = "part-"
BINARY_CHUNK_BYTES = 2**30
"""Largest Arrow binary chunk built (Arrow's binary type addresses under 2 GiB per chunk)."""
ROW_GROUP_ROWS = 16
"""Rows per Parquet row group of a part. Training reads samples in a shuffled order, and a row is read
with its whole row group's column chunks: 16 rows are about 4 MB of visual tokens at 7B scale (250 KB a
row), where one group per part would be 500 MB. Smaller groups would grow the footer read on each open."""
STATISTICS_COLUMNS = ["index", "num_tokens", "num_kept", "has_aggregate", "token_dim"]
"""Columns with min/max statistics: those of the long strings and bytes would make up most of a
footer of many row groups (about 8 KB a group), and no reader filters on them."""


def part_table(meta: Sequence[dict], reduced: ReducedRows, token_dim: int) -> pa.Table:
    """One cache part: the samples' fields (meta, in order) and their TRIM results, built from the
    host arrays without a Python object per token row (Arrow arrays over the same buffers)."""
    count = len(meta)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        name: pa.array([m[name] for m in meta], type=CACHE_SCHEMA.field(name).type) for name in META_COLUMNS}
    columns["num_tokens"] = pa.array(reduced.num_tokens.astype(np.int32))
    columns["num_kept"] = pa.array(np.where(reduced.has_image, reduced.num_kept, 0).astype(np.int32))
    columns["has_aggregate"] = pa.array(reduced.has_aggregate & reduced.has_image)
    columns["token_dim"] = pa.array(np.full(count, token_dim, dtype=np.int32))
    row_bytes = reduced.num_tokens.astype(np.int64) * token_dim * 2
    columns["tokens"] = _binary(reduced.tokens.reshape(-1).view(np.uint8), row_bytes)
    width = reduced.scores.shape[1] if reduced.scores.ndim == 2 else 0
    columns["scores"] = _binary(reduced.scores.reshape(-1).view(np.uint8), reduced.has_image * width * 2)
    columns["kept_indices"] = _kept_lists(reduced, count)
    return pa.table([columns[f.name] for f in CACHE_SCHEMA], schema=CACHE_SCHEMA)


def _binary(data: np.ndarray, row_bytes: np.ndarray) -> pa.ChunkedArray:
    """Rows of `row_bytes` consecutive bytes of `data` as binary values, in chunks under 2 GiB."""
    ends = np.cumsum(row_bytes)
    chunks: list[pa.Array] = []
    row = start = 0
    while row < len(row_bytes) or not chunks:
        stop = max(int(np.searchsorted(ends, start + BINARY_CHUNK_BYTES, side="right")), row + 1)
        stop = min(stop, len(row_bytes))
        offsets = np.concatenate([[0], ends[row:stop] - start]).astype(np.int32)
        end = int(ends[stop - 1]) if stop > row else start
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data[start:end])]
        chunks.append(pa.Array.from_buffers(pa.binary(), stop - row, buffers))
        row, start = stop, end
    return pa.chunked_array(chunks, type=pa.binary())


def _kept_lists(reduced: ReducedRows, count: int) -> pa.Array:
    """kept_indices: each image row's kept patch numbers (ascending), [] for the others."""
    rows, patches = np.nonzero(reduced.keep)
    per_image = np.bincount(rows, minlength=reduced.keep.shape[0]) if reduced.keep.size else np.zeros(0, np.int64)
    per_row = np.zeros(count, dtype=np.int64)
    per_row[reduced.has_image] = per_image
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(patches.astype(np.int16)))


def write_part(cache: str, name: str, table: pa.Table) -> int:
    """Write a part whole (a reader or a resumed run never sees half of one), in row groups of
    ROW_GROUP_ROWS; returns its bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                   write_statistics=STATISTICS_COLUMNS)
    data = sink.getvalue()
    storage.write_bytes(storage.join(cache, name), data.to_pybytes())
    return data.size


def committed_parts(cache: str) -> list[str]:
    """The parts already written in a version folder being written (a part is written whole, so each
    listed one is complete). The writer's view: readers use cache_files."""
    return [n for n in storage.listdir(cache, ".parquet") if n.startswith(PART_PREFIX)]


def cache_files(cache: str) -> tuple[str, dict[str, int]]:
    """(version folder, part -> rows) of the complete cache at `cache`: a cache root (its current
    version) or a version folder. Raises where the manifest lists no parts or a part is missing or
    holds other rows than it records (the error names the file)."""
    from pipelines.manifests import CacheManifest, check_files, resolve_output

    folder = resolve_output(cache)
    manifest = CacheManifest.read(folder)
    check_files(folder, manifest.files, "precompute")
    return folder, manifest.files


def decode_tokens(row: dict) -> torch.Tensor:
    """A cache row's visual tokens as a [num_tokens, token_dim] fp16 tensor."""
    count, dim = int(row["num_tokens"]), int(row["token_dim"])
    if count == 0:
        return torch.zeros(0, dim, dtype=torch.float16)
    return torch.from_numpy(np.frombuffer(row["tokens"], dtype=np.float16).reshape(count, dim).copy())


def decode_scores(row: dict) -> np.ndarray:
    return np.frombuffer(row["scores"], dtype=np.float16).astype(np.float32) if row["scores"] else np.zeros(0)


def to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to(torch.float16).cpu().numpy().tobytes()


def iter_cache(cache: str, columns: list[str] | None = None) -> Iterator[dict]:
    """The rows of the complete cache at `cache` (see cache_files), part by part."""
    folder, files = cache_files(cache)
    for name in sorted(files):
        yield from storage.read_parquet(storage.join(folder, name), columns=columns).to_pylist()


def read_parts(folder: str, names: Sequence[str], columns: list[str]) -> dict[str, pa.Table]:
    """Some columns of the named parts of a folder, one Arrow table per part (compact: no Python
    object per row)."""
    return {name: storage.read_parquet(storage.join(folder, name), columns=columns) for name in names}
