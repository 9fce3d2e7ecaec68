"""Local paths and s3:// URIs behind one small interface, for every stage.

S3 goes through s3fs, which takes credentials and the endpoint from the standard AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION); nothing here prints
them. pyarrow and Ray Data get the same filesystem wrapped as a pyarrow filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from functools import lru_cache
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@lru_cache(maxsize=8)
def _s3fs(endpoint: str | None) -> fsspec.AbstractFileSystem:
    import s3fs

    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return s3fs.S3FileSystem(**kwargs)


def fsspec_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or s3:// URI."""
    if is_s3(uri):
        return _s3fs(os.environ.get("AWS_ENDPOINT_URL")), uri[len("s3://"):]
    return fsspec.filesystem("file"), os.path.abspath(uri)


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for pyarrow.parquet and Ray Data."""
    fs, path = fsspec_fs(uri)
    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_s3(base) else os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = fsspec_fs(uri)
    if not is_s3(uri):
        fs.makedirs(path, exist_ok=True)


def listdir(uri: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under uri ending in suffix, sorted; [] if absent."""
    fs, path = fsspec_fs(uri)
    fs.invalidate_cache(path)  # another process (a resumed job's predecessor) may have written here
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if n.endswith(suffix))


def size(uri: str) -> int:
    fs, path = fsspec_fs(uri)
    return int(fs.size(path))


def stat(uri: str) -> tuple[int, str]:
    """(size, modification stamp) of a file: locally its mtime in ns, on S3 its ETag (else LastModified).
    Raises OSError (FileNotFoundError among them) when there is no such file."""
    if not is_s3(uri):
        info = os.stat(uri)
        return int(info.st_size), str(info.st_mtime_ns)
    fs, path = fsspec_fs(uri)
    fs.invalidate_cache(path)  # a listing cached earlier in this process would hide a rewrite
    info = fs.info(path)
    return int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified") or "")


def sha256(uri: str) -> str:
    """Hex SHA-256 of a file's bytes, streamed (never the whole file in memory)."""
    fs, path = fsspec_fs(uri)
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def parquet_rows(uri: str) -> int:
    """Rows of a Parquet file, from its footer alone."""
    fs, path = arrow_fs(uri)
    with fs.open_input_file(path) as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write whole: locally through a temporary file and a rename, on S3 as one PUT, so a reader
    (or a resumed job) never sees half a file."""
    fs, path = fsspec_fs(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, data: Any) -> None:
    write_bytes(uri, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_parquet(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """A Parquet file written whole (see write_bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = arrow_fs(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def remove(uri: str) -> None:
    fs, path = fsspec_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def local_copy(uri: str, skip_suffixes: tuple[str, ...] = ()) -> str:
    """A local directory with the contents of uri (uri itself when it is local), less the files
    whose names end in skip_suffixes (e.g. the weights, where only configs are read)."""
    if not is_s3(uri):
        return uri
    fs, path = fsspec_fs(uri)
    local = tempfile.mkdtemp(prefix="trim-eval-")
    root = path.rstrip("/")
    if not skip_suffixes:
        fs.get(root + "/", local + "/", recursive=True)
        return local
    for name in fs.find(root):
        if not name.endswith(skip_suffixes):
            target = os.path.join(local, os.path.relpath(name, root))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get(name, target)
    return local


def fingerprint(uri: str) -> list[list]:
    """(relative name, size, modification stamp) of every file under a directory, local or S3."""
    fs, path = fsspec_fs(uri)
    fs.invalidate_cache(path)
    out = []
    for name, info in sorted(fs.find(path, detail=True).items()):
        stamp = info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("created")
        out.append([os.path.relpath(name, path), int(info.get("size") or 0), str(stamp)])
    return out
