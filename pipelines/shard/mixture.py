"""Reading LLaVA's instruction mixture without holding it whole: a JSON array (as LLaVA ships it) or
JSONL, local or s3://, streamed in blocks.

`scan_chunks` walks the file once and returns where every run of `rows` records starts and ends (byte
offsets), so that many workers can each parse one run (`read_chunk`) in parallel. A record's index is
its position in the array, or its line number in JSONL (blank lines count, as before). The scan
decodes bytes as latin-1, one character per byte, so its character offsets are byte offsets; JSON's
structure is ASCII and UTF-8 continuation bytes never look like quotes or brackets, so records
split the same way; the workers decode their run as UTF-8.

A file that cannot be a mixture as a whole (empty, not JSON, a JSON object, UTF-16, compressed, an
array that is not closed) is refused by the scan, before any work, with a MixtureError naming the file
and the line. A record that cannot be read (bad UTF-8, a line that does not parse, JSON nested too deep
or with an integer too long for Python) is handed on as its exception, so that it alone is set aside,
wherever it stands: a JSONL file whose first line is not a record is still JSONL when its next record
line is one. A UTF-8 byte order mark at the start is skipped. The JSON text itself is read by
pipelines.shard.json_text.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines import storage
from pipelines.images import describe_mode, unusable_path
from pipelines.shard.json_text import (
    BOM,
    MixtureError,
    array_records,
    decode_lenient,
    decode_record,
    json_type,
    sniff,
)

__all__ = ["BOM", "Chunk", "MixtureError", "array_records", "decode_record", "iter_records", "read_chunk",
           "scan_chunks"]

BLOCK_BYTES = 8 * 2**20
"""Bytes read per step while scanning."""

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive records of the mixture file."""

    number: int
    """Its place among the runs (0, 1, ...): shard names its samples file after it."""
    start: int
    """Byte offset of its first record."""
    end: int
    """Byte offset just past its last record."""
    first_index: int
    """Index of its first record in the mixture."""
    count: int
    """Records (JSONL: lines, blank ones included) in it."""
    jsonl: bool
    """Whether the file is JSONL (else a JSON array)."""


def _blocks(uri: str) -> Iterator[bytes]:
    fs, path = storage.fsspec_fs(uri)
    if not storage.is_s3(uri):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a named pipe would block, a socket cannot be read
            raise MixtureError(f"{uri}: {describe_mode(mode)}, not a regular file (paths.mixture)")
    with fs.open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            yield block


def _is_array(blocks: Iterator[bytes], name: str) -> tuple[bool, bytes]:
    """Whether the stream is a JSON array (its first non-blank byte after a BOM is "["), and the bytes
    read. Refuses compressed files and UTF-16 (a mixture is UTF-8 text): json_text.sniff."""
    head = b""
    for block in blocks:
        head += block
        if head.removeprefix(BOM).strip():
            break
    sniff(head, name)
    return head.removeprefix(BOM).lstrip().startswith(b"["), head


def scan_chunks(uri: str, rows: int) -> tuple[list[Chunk], list[str]]:
    """The mixture at uri cut into runs of `rows` records, and the distinct image paths its records
    name (sorted). Runs in a worker (Ray task): memory holds one block, the runs and the distinct
    paths (one per image, not per record), never the records. Raises MixtureError for a file that
    cannot be a mixture (see the module doc)."""
    blocks = _blocks(uri)
    is_array, head = _is_array(blocks, uri)
    stream = _chain(head, blocks)
    paths: set[str] = set()
    chunks = _array_chunks(stream, uri, rows, paths) if is_array else _jsonl_chunks(stream, uri, rows, paths)
    if not chunks:
        raise MixtureError(f"{uri}: holds no records ({'an empty array' if is_array else 'empty or blank lines only'})")
    return chunks, sorted(paths)


def _jsonl_chunks(stream: Iterator[bytes], uri: str, rows: int, paths: set[str]) -> list[Chunk]:
    chunks: list[Chunk] = []
    offset = lines = chunk_start = 0
    tail = b""
    scan = _LineScan(uri, paths)
    for block in stream:
        text, begin = tail + block, 0
        base = offset - len(tail)
        while (newline := text.find(b"\n", begin)) >= 0:
            scan.line(text[begin:newline], lines)
            lines, begin = lines + 1, newline + 1
            if lines % rows == 0:
                chunks.append(Chunk(len(chunks), chunk_start, base + begin, lines - rows, rows, jsonl=True))
                chunk_start = base + begin
        tail = text[begin:]
        offset += len(block)
    if tail.strip():
        scan.line(tail, lines)
        lines += 1
    scan.finish()
    if not scan.records:
        return []
    if offset > chunk_start:
        first = len(chunks) * rows
        chunks.append(Chunk(len(chunks), chunk_start, offset, first, max(lines - first, 0), jsonl=True))
    return chunks


class _LineScan:
    """The JSONL scan's view of its lines: how many records, their image paths, and whether the file is
    JSONL at all. It is when its first record line is a JSON object (read past bytes that are not
    UTF-8), or when that line is not but the next record line is: the first line is then one bad
    record. Else the file is not JSONL (a pretty-printed object, a text file) and is refused."""

    def __init__(self, uri: str, paths: set[str]):
        self.uri, self.paths = uri, paths
        self.records = self.first_line = 0
        self.first_problem: Any = None

    def line(self, line: bytes, number: int) -> None:
        if _blank(line, number):
            return
        self.records += 1
        if self.records == 1:
            self.first_line = number + 1
            record = decode_lenient(line)
            if isinstance(record, dict):
                _note_image(record.get("image"), self.paths)
            else:
                self.first_problem = record
        elif self.records == 2 and self.first_problem is not None:
            if not isinstance(decode_lenient(line), dict):
                self.refuse()
        if self.records > 1 and b'"image"' in line:
            record = decode_line(line, number)
            if isinstance(record, dict):  # lines that do not read are the workers' to set aside
                _note_image(record.get("image"), self.paths)

    def refuse(self) -> None:
        problem = self.first_problem
        what = f"{type(problem).__name__}: {problem}" if isinstance(problem, Exception) else \
            f"JSON {json_type(problem)}"
        raise MixtureError(f"{self.uri} line {self.first_line}: not a JSON record ({what}), nor is the next; a "
                           f"mixture is a JSON array of records, or JSONL with one record per line")

    def finish(self) -> None:
        if self.records == 1 and self.first_problem is not None:
            self.refuse()
        if self.records == 1 and self.uri.endswith(".json"):
            raise MixtureError(f"{self.uri} line {self.first_line}: holds one JSON object, not an array of records "
                               f"(JSONL is read from any name, but a .json file of one line is taken for a mistake)")


def _note_image(image: Any, paths: set[str]) -> None:
    # A path with a lone surrogate is not text, one with a NUL no file's name: its record is set aside,
    # the image never looked for.
    if isinstance(image, str) and image and not _SURROGATE.search(image) and not unusable_path(image):
        paths.add(image)


def _array_chunks(stream: Iterator[bytes], uri: str, rows: int, paths: set[str]) -> list[Chunk]:
    chunks: list[Chunk] = []
    start = end = count = 0
    for first, last, record, text in array_records(stream, uri):
        image = record.get("image") if isinstance(record, dict) else None
        if isinstance(image, str) and not image.isascii():
            # Decoded as latin-1 above: read the record again as the UTF-8 its bytes are (a path may
            # hold UTF-8 bytes or \u escapes, which latin-1 alone cannot tell apart).
            again = decode_record(text.encode("latin-1"))
            image = again.get("image") if isinstance(again, dict) else None
        _note_image(image, paths)
        if count == 0:
            start = first
        end, count = last, count + 1
        if count == rows:
            chunks.append(Chunk(len(chunks), start, end, len(chunks) * rows, count, jsonl=False))
            count = 0
    if count:
        chunks.append(Chunk(len(chunks), start, end, len(chunks) * rows, count, jsonl=False))
    return chunks


def _chain(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from rest


def decode_line(line: bytes, index: int) -> Any:
    """A JSONL line as a record, or its exception (see decode_record); the first line may start with
    a byte order mark."""
    return decode_record(line.removeprefix(BOM) if index == 0 else line)


def _blank(line: bytes, index: int) -> bool:
    return not (line.removeprefix(BOM) if index == 0 else line).strip()


def jsonl_records(data: bytes, first_index: int) -> Iterator[tuple[int, Any]]:
    """(index, record) of the JSONL lines in data; a line that does not read is yielded as the
    exception, so it becomes a reject instead of stopping the job; blank lines are skipped."""
    for offset, line in enumerate(data.split(b"\n")):
        if not _blank(line, first_index + offset):
            yield first_index + offset, decode_line(line, first_index + offset)


def read_chunk(uri: str, chunk: Chunk) -> Iterator[tuple[int, Any]]:
    """(index, record) of one run of the mixture, read with one ranged read."""
    fs, path = storage.fsspec_fs(uri)
    with fs.open(path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    yield from parse_chunk(data, chunk)


def parse_chunk(data: bytes, chunk: Chunk) -> Iterator[tuple[int, Any]]:
    """(index, record) of the bytes of one run (see read_chunk)."""
    if chunk.jsonl:
        yield from jsonl_records(data, chunk.first_index)
        return
    try:  # the run's bytes are its records and the commas between them: one C-speed parse of them all
        records = json.loads("[" + data.decode("utf-8") + "]")
    except (ValueError, RecursionError):  # some record does not read: read them one by one, so it alone is set aside
        wrapped = b"[" + data + b"]"
        records = [decode_record(wrapped[start:end]) for start, end, _, _ in array_records([wrapped], "a run")]
    if len(records) != chunk.count:
        raise ValueError(f"run {chunk.number} of the mixture holds {len(records)} records, {chunk.count} expected")
    yield from enumerate(records, chunk.first_index)


def iter_records(data: bytes, name: str) -> Iterator[tuple[int, Any]]:
    """(index, record) of a whole mixture held in memory (tests, small files): the same parsing as
    the streamed path. A record that does not read is yielded as the exception."""
    is_array, _ = _is_array(iter([data]), name)
    if not is_array:
        yield from jsonl_records(data, 0)
        return
    for index, (start, end, _, _) in enumerate(array_records([data], name)):
        yield index, decode_record(data[start:end])
