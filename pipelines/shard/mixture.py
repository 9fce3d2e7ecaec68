"""Reading LLaVA's instruction mixture without holding it whole: a JSON array (as LLaVA ships it) or
JSONL, local or s3://, streamed in blocks.

`scan_chunks` walks the file once and returns where every run of `rows` records starts and ends (byte
offsets), so that many workers can each parse one run (`read_chunk`) in parallel. A record's index is
its position in the array, or its line number in JSONL (blank lines count, as before). The scan
decodes bytes as latin-1, one character per byte, so its character offsets are byte offsets; JSON's
structure is ASCII and UTF-8 continuation bytes never look like quotes or brackets, so records
split the same way; the workers decode their run as UTF-8.

A file that cannot be a mixture as a whole (empty, not JSON, a JSON object, UTF-16, an array that
is not closed) is refused by the scan, before any work, with a MixtureError naming the file and the
line. A record that cannot be read (bad UTF-8, a JSONL line that does not parse) is handed on as its
exception, so that it alone is set aside. A UTF-8 byte order mark at the start is skipped.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipelines import storage

BLOCK_BYTES = 8 * 2**20
"""Bytes read per step while scanning."""
MAX_RECORD_BYTES = 256 * 2**20
"""A record still unparsed after this many bytes makes the array invalid (rather than reading on)."""
BOM = b"\xef\xbb\xbf"
"""UTF-8's byte order mark: some editors and tools write it at the start of a file."""

_SPACE = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_DECODER = json.JSONDecoder()


class MixtureError(ValueError):
    """A mixture file that cannot be read as a whole; the message names the file (and the line)."""


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
    if not storage.is_s3(uri) and not stat.S_ISREG(os.stat(path).st_mode):  # a named pipe would block
        raise MixtureError(f"{uri}: not a regular file")
    with fs.open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            yield block


def _is_array(blocks: Iterator[bytes], name: str) -> tuple[bool, bytes]:
    """Whether the stream is a JSON array (its first non-blank byte after a BOM is "["), and the bytes
    read. Refuses UTF-16 (a mixture is UTF-8)."""
    head = b""
    for block in blocks:
        head += block
        if head.removeprefix(BOM).strip():
            break
    body = head.removeprefix(BOM)
    if body.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in body[:4]:
        raise MixtureError(f"{name} line 1: encoded as UTF-16 (a UTF-16 byte order mark or NUL bytes at the "
                           f"start); a mixture must be UTF-8")
    return body.lstrip().startswith(b"["), head


def array_records(blocks: Iterable[bytes], name: str) -> Iterator[tuple[int, int, Any, str]]:
    """(start, end, record, text) of each element of a JSON array streamed in byte blocks; offsets are
    bytes from the start of the stream, records and their text are decoded as latin-1 (see the module
    doc). Raises MixtureError naming `name` and the line if the bytes are not one JSON array."""
    stream = iter(blocks)
    text, base, pos, done, lines = "", 0, 0, False, 0

    def more() -> bool:
        nonlocal text, base, pos, done, lines
        block = next(stream, None)
        if block is None:
            done = True
            return False
        lines += text.count("\n", 0, pos)
        text, base, pos = text[pos:] + block.decode("latin-1"), base + pos, 0
        return True

    def skip_space() -> bool:  # False at the end of the stream
        nonlocal pos
        while True:
            pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]  # the pattern matches ""
            if pos < len(text) or not more():
                return pos < len(text)

    def invalid(what: str, at: int) -> MixtureError:
        line = lines + text.count("\n", 0, at) + 1
        return MixtureError(f"{name}: not valid JSON ({what}) at line {line} (byte {base + at})")

    if more() and text.startswith(BOM.decode("latin-1")):
        pos = len(BOM)
    if not skip_space() or text[pos] != "[":
        raise invalid("expected an array of records", pos)
    pos += 1
    expect_value = None  # None: a value or "]" may follow "["; True: after ","
    while True:
        if not skip_space():
            raise invalid("the array is not closed", pos)
        if text[pos] == "]" and expect_value is not True:
            pos += 1
            if skip_space():
                raise invalid("more after the array's closing ']'", pos)
            return
        if expect_value is False:
            if text[pos] != ",":
                raise invalid("expected ',' or ']'", pos)
            pos += 1
            expect_value = True
            continue
        while True:
            try:
                record, end = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                if done or len(text) - pos > MAX_RECORD_BYTES or not more():
                    raise invalid(err.msg, err.pos) from err
                continue
            if end < len(text) or done or not more():  # a number at the very end may go on
                break
        yield base + pos, base + end, record, text[pos:end]
        pos, expect_value = end, False


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
    offset = lines = chunk_start = records = first_line = 0
    tail = b""
    for block in stream:
        text, begin = tail + block, 0
        base = offset - len(tail)
        while (newline := text.find(b"\n", begin)) >= 0:
            records += _scan_line(text[begin:newline], lines, records, uri, paths)
            first_line = first_line or (records and lines + 1)
            lines, begin = lines + 1, newline + 1
            if lines % rows == 0:
                chunks.append(Chunk(len(chunks), chunk_start, base + begin, lines - rows, rows, jsonl=True))
                chunk_start = base + begin
        tail = text[begin:]
        offset += len(block)
    if tail.strip():
        records += _scan_line(tail, lines, records, uri, paths)
        lines += 1
    if not records:
        return []
    if records == 1 and uri.endswith(".json"):
        raise MixtureError(f"{uri} line {first_line or lines}: holds one JSON object, not an array of records "
                           f"(JSONL is read from any name, but a .json file of one line is taken for a mistake)")
    if offset > chunk_start:
        first = len(chunks) * rows
        chunks.append(Chunk(len(chunks), chunk_start, offset, first, max(lines - first, 0), jsonl=True))
    return chunks


def _scan_line(line: bytes, number: int, records: int, uri: str, paths: set[str]) -> int:
    """1 for a record line, 0 for a blank one; notes its image path. The first record line must be a
    JSON object: else the file is not JSONL (a pretty-printed object, a text file) and is refused."""
    if _blank(line, number):
        return 0
    if records == 0:
        record = decode_line(line, number)
        if not isinstance(record, dict):
            what = f"{type(record).__name__}: {record}" if isinstance(record, Exception) else type(record).__name__
            raise MixtureError(f"{uri} line {number + 1}: not a JSON record ({what}); a mixture is a JSON array of "
                               f"records, or JSONL with one record per line")
        _note_image(record.get("image"), paths)
    elif b'"image"' in line:
        record = decode_line(line, number)
        if isinstance(record, dict):  # lines that do not read are the workers' to set aside
            _note_image(record.get("image"), paths)
    return 1


def _note_image(image: Any, paths: set[str]) -> None:
    # A path with a lone surrogate is not text: its record is set aside, the image never looked for.
    if isinstance(image, str) and image and not _SURROGATE.search(image):
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


def decode_record(data: bytes) -> Any:
    """One record's bytes as JSON read from strict UTF-8, or the exception if they are not (a
    UnicodeDecodeError for bytes that are not UTF-8, a JSONDecodeError for text that is not JSON)."""
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as err:
        return err


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
    except ValueError:  # some record is not UTF-8: read them one by one, so that it alone is set aside
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
