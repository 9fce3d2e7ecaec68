"""The JSON text of a mixture: what kind of file it is (from its first bytes), each record decoded on
its own, and the elements of a JSON array streamed in byte blocks.

A record is decoded alone, so whatever is wrong with it (bytes that are not UTF-8, text that is not
JSON, JSON nested deeper than Python's reader follows, an integer longer than Python reads) comes back
as the exception in its place, and it alone is set aside. The array streamer cuts a record whose JSON
Python cannot hold by its structure (brackets and strings), so the records after it still read.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

MAX_RECORD_BYTES = 256 * 2**20
"""A record still unparsed after this many bytes makes the array invalid (rather than reading on)."""
BOM = b"\xef\xbb\xbf"
"""UTF-8's byte order mark: some editors and tools write it at the start of a file."""
COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
              (b"BZh", "bzip2", "bunzip2 -k"), (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"PK\x03\x04", "zip", "unzip"))
"""(magic bytes, format, the command that undoes it) of the compressed files a mixture is mistaken for."""

_SPACE = re.compile(r"[ \t\n\r]*")
# A JSON string (or the start of one the text cuts off) or a structural character.
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{},]', re.DOTALL)
_DECODER = json.JSONDecoder()
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
               dict: "object"}


class MixtureError(ValueError):
    """A mixture file that cannot be read as a whole; the message names the file (and the line)."""


class RecordError(ValueError):
    """A record that is JSON Python cannot hold (nested too deep, an integer too long): it is set aside."""


def json_type(value: Any) -> str:
    """JSON's name for the type of a decoded value: null, boolean, number, string, array, object."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def sniff(head: bytes, name: str) -> None:
    """Refuse, naming the file, what cannot be a mixture from its first bytes: a compressed file
    (its format named, with the command that decompresses it) or UTF-16 text."""
    for magic, kind, command in COMPRESSED:
        if head.startswith(magic):
            raise MixtureError(f"{name}: a {kind}-compressed file (it starts with {kind}'s magic bytes), not JSON "
                               f"text; decompress it first ({command}) and point paths.mixture at the result")
    body = head.removeprefix(BOM)
    if body.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in body[:4]:
        raise MixtureError(f"{name} line 1: encoded as UTF-16 (a UTF-16 byte order mark or NUL bytes at the "
                           f"start); a mixture must be UTF-8")


def held_error(err: Exception) -> Exception:
    """The exception a record that Python's JSON reader gives up on is set aside with, saying why."""
    if isinstance(err, RecursionError):
        return RecordError(f"nested deeper than Python's JSON reader follows (about {sys.getrecursionlimit()} "
                           f"levels of arrays and objects)")
    if "integer string conversion" in str(err):
        return RecordError(f"holds an integer of more than {sys.get_int_max_str_digits()} digits, longer than "
                           f"Python reads (sys.get_int_max_str_digits)")
    return err


def decode_record(data: bytes) -> Any:
    """One record's bytes as JSON read from strict UTF-8, or the exception if they are not (a
    UnicodeDecodeError for bytes that are not UTF-8, a JSONDecodeError for text that is not JSON, a
    RecordError for JSON that Python cannot hold)."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        return held_error(err)


def decode_lenient(data: bytes) -> Any:
    """A line's bytes as JSON with bytes that are not UTF-8 replaced, or the exception: whether the
    line is a record at all, whatever else is wrong with it."""
    try:
        return json.loads(data.removeprefix(BOM).decode("utf-8", errors="replace"))
    except (ValueError, RecursionError) as err:
        return held_error(err)


def value_end(text: str, pos: int) -> int | None:
    """Where the JSON value at text[pos] ends, from its structure alone (brackets outside strings), or
    None if the text ends first."""
    depth = 0
    for match in _STRUCTURE.finditer(text, pos):
        token = match.group()
        if match.end() == len(text) and (token[0] == '"' or depth):  # it may go on past the text
            return None
        if token[0] == '"':
            if depth == 0:
                return match.end()
        elif token in "[{":
            depth += 1
        elif depth == 0:  # "," or a closing bracket after a number, true, false or null
            return len(text[:match.start()].rstrip(" \t\n\r")) if match.start() > pos else None
        elif token != ",":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def array_records(blocks: Iterable[bytes], name: str) -> Iterator[tuple[int, int, Any, str]]:
    """(start, end, record, text) of each element of a JSON array streamed in byte blocks; offsets are
    bytes from the start of the stream, records and their text are decoded as latin-1 (see
    pipelines.shard.mixture). An element that Python cannot hold comes as its RecordError. Raises
    MixtureError naming `name` and the line if the bytes are not one JSON array."""
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

    def give_up() -> bool:  # True when no more text can complete the element at pos
        return done or len(text) - pos > MAX_RECORD_BYTES or not more()

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
                if give_up():
                    raise invalid(err.msg, err.pos) from err
                continue
            except (ValueError, RecursionError) as err:  # JSON, but not what Python holds: cut it by its brackets
                found = value_end(text, pos)
                if found is None:
                    if give_up():
                        raise invalid("the array is not closed", pos) from err
                    continue
                record, end = held_error(err), found
                break
            if end < len(text) or done or not more():  # a number at the very end may go on
                break
        yield base + pos, base + end, record, text[pos:end]
        pos, expect_value = end, False
