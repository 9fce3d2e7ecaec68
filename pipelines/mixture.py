"""Reading LLaVA's instruction mixture without holding it whole: a JSON array (as LLaVA ships it) or
JSONL, local or s3://, streamed in blocks.

`scan_chunks` walks the file once and returns where every run of `rows` records starts and ends (byte
offsets), so that many workers can each parse one run (`read_chunk`) in parallel. A record's index is
its position in the array, or its line number in JSONL (blank lines count, as before). The scan
decodes bytes as latin-1, one character per byte, so its character offsets are byte offsets; JSON's
structure is ASCII and UTF-8 continuation bytes never look like quotes or brackets, so records
split the same way; the workers decode their run as UTF-8.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipelines import storage

BLOCK_BYTES = 8 * 2**20
"""Bytes read per step while scanning."""
MAX_RECORD_BYTES = 256 * 2**20
"""A record still unparsed after this many bytes makes the array invalid (rather than reading on)."""

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


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
    with fs.open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            yield block


def _is_array(blocks: Iterator[bytes]) -> tuple[bool, bytes]:
    """Whether the stream is a JSON array (its first non-blank byte is "["), and the bytes read."""
    head = b""
    for block in blocks:
        head += block
        if head.strip():
            break
    return head.lstrip().startswith(b"["), head


def array_records(blocks: Iterable[bytes], name: str) -> Iterator[tuple[int, int, Any]]:
    """(start, end, record) of each element of a JSON array streamed in byte blocks; offsets are
    bytes from the start of the stream, records are decoded as latin-1 (see the module doc).
    Raises ValueError naming `name` if the bytes are not a JSON array."""
    stream = iter(blocks)
    text, base, pos, done = "", 0, 0, False

    def more() -> bool:
        nonlocal text, base, pos, done
        block = next(stream, None)
        if block is None:
            done = True
            return False
        text, base, pos = text[pos:] + block.decode("latin-1"), base + pos, 0
        return True

    def skip_space() -> bool:  # False at the end of the stream
        nonlocal pos
        while True:
            pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]  # the pattern matches ""
            if pos < len(text) or not more():
                return pos < len(text)

    if not skip_space() or text[pos] != "[":
        raise ValueError(f"{name}: not valid JSON (expected an array)")
    pos += 1
    expect_value = None  # None: a value or "]" may follow "["; True: after ","
    while True:
        if not skip_space():
            raise ValueError(f"{name}: not valid JSON (the array is not closed)")
        if text[pos] == "]" and expect_value is not True:
            return
        if expect_value is False:
            if text[pos] != ",":
                raise ValueError(f"{name}: not valid JSON (expected ',' or ']' at byte {base + pos})")
            pos += 1
            expect_value = True
            continue
        while True:
            try:
                record, end = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                if done or len(text) - pos > MAX_RECORD_BYTES or not more():
                    raise ValueError(f"{name}: not valid JSON ({err.msg} at byte {base + err.pos})") from err
                continue
            if end < len(text) or done or not more():  # a number at the very end may go on
                break
        yield base + pos, base + end, record
        pos, expect_value = end, False


def scan_chunks(uri: str, rows: int) -> tuple[list[Chunk], list[str]]:
    """The mixture at uri cut into runs of `rows` records, and the distinct image paths its records
    name (sorted). Runs in a worker (Ray task): memory holds one block, the runs and the distinct
    paths (one per image, not per record), never the records."""
    blocks = _blocks(uri)
    is_array, head = _is_array(blocks)
    stream = _chain(head, blocks)
    paths: set[str] = set()
    if is_array:
        chunks = _array_chunks(array_records(stream, uri), rows, paths)
        # The scan decoded as latin-1: back to the UTF-8 text the path really is.
        return chunks, sorted({p.encode("latin-1").decode("utf-8", errors="replace") for p in paths})
    chunks = []
    offset = lines = chunk_start = 0
    tail = b""
    for block in stream:
        text, begin = tail + block, 0
        base = offset - len(tail)
        while (newline := text.find(b"\n", begin)) >= 0:
            _image_path(text[begin:newline], paths)
            lines, begin = lines + 1, newline + 1
            if lines % rows == 0:
                chunks.append(Chunk(len(chunks), chunk_start, base + begin, lines - rows, rows, jsonl=True))
                chunk_start = base + begin
        tail = text[begin:]
        offset += len(block)
    if tail.strip():
        _image_path(tail, paths)
        lines += 1
    if offset > chunk_start:
        first = len(chunks) * rows
        chunks.append(Chunk(len(chunks), chunk_start, offset, first, max(lines - first, 0), jsonl=True))
    return chunks, sorted(paths)


def _image_path(line: bytes, paths: set[str]) -> None:
    """Note the image path of one JSONL line (lines that do not parse are the workers' to reject)."""
    if b'"image"' not in line:
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return
    _note_image(record, paths)


def _note_image(record: Any, paths: set[str]) -> None:
    if isinstance(record, dict) and isinstance(record.get("image"), str) and record["image"]:
        paths.add(record["image"])


def _array_chunks(records: Iterator[tuple[int, int, Any]], rows: int, paths: set[str]) -> list[Chunk]:
    chunks: list[Chunk] = []
    start = end = count = 0
    for first, last, record in records:
        _note_image(record, paths)
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


def jsonl_records(data: bytes, first_index: int) -> Iterator[tuple[int, Any]]:
    """(index, record) of the JSONL lines in data; a line that does not parse is yielded as the
    exception, so it becomes a reject instead of stopping the job; blank lines are skipped."""
    for offset, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            yield first_index + offset, json.loads(line)
        except json.JSONDecodeError as err:
            yield first_index + offset, err


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
    # The run's bytes are its records and the commas between them: one C-speed parse of them all.
    records = json.loads(b"[" + data + b"]")
    if len(records) != chunk.count:
        raise ValueError(f"run {chunk.number} of the mixture holds {len(records)} records, {chunk.count} expected")
    yield from enumerate(records, chunk.first_index)


def iter_records(data: bytes, name: str) -> Iterator[tuple[int, Any]]:
    """(index, record) of a whole mixture held in memory (tests, small files): the same parsing as
    the streamed path. A JSONL line that does not parse is yielded as the exception."""
    if not data.lstrip().startswith(b"["):
        yield from jsonl_records(data, 0)
        return
    for index, (start, end, _) in enumerate(array_records([data], name)):
        yield index, json.loads(data[start:end])
