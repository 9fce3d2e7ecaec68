"""The TRIM cache's row format, in one place for its writer (precompute) and its readers (training,
pictures, benchmarks): the Parquet schema, tensors to and from bytes, and reading the parts."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from pipelines import storage

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
    for name in storage.listdir(cache, ".parquet"):
        if name.startswith("part-"):
            yield from storage.read_parquet(storage.join(cache, name), columns=columns).to_pylist()
