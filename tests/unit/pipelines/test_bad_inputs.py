"""The bad-input corpus: each case a small mixture (and image folder) driven through the shard stage's
pure core (scan, image pass, runs), as run_shard drives it but without Ray. Every case ends one way:
refused before any work with a MixtureError naming the file (and the line, where there is one), set
aside with a named reason whose detail names the mixture file, the record and its id (and the image
file), or read correctly."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import signal
import socket
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipelines.config import ShardConfig
from pipelines.images import BAD_PATH
from pipelines.shard.image_index import ImageIndex, hash_image_batch
from pipelines.shard.mixture import MixtureError, scan_chunks
from pipelines.shard.records import sort_run

TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
GOOD = {"id": "good", "image": "ok/good.png", "conversations": TURNS}
TEXT_TURNS = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]


SMALL_RUNS = ShardConfig(rows_per_shard=2)


def shard_locally(mixture: Path, images: Path, cfg: ShardConfig = SMALL_RUNS):
    """run_shard's steps without Ray or files: scan, image pass, runs. Returns (kept, rejects)."""
    chunks, paths = scan_chunks(str(mixture), cfg.rows_per_shard)
    found = hash_image_batch({"path": paths}, str(images), cfg=cfg)
    index = ImageIndex()
    for row in zip(*(found[k] for k in ("path", "image_key", "width", "height", "size", "error", "detail"))):
        index.add(*row)
    kept, rejects = [], []
    for chunk in chunks:
        k, r = sort_run(str(mixture), chunk, index.key_of, index.error_of)
        kept += k
        rejects += r
    return kept, rejects


# Writers: each makes a case's files under a folder and returns the mixture's path ------------------


def _png(path: Path, size=(8, 6), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height pixels, all zero: a few hundred KB on disk."""
    squeeze = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)
    data = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _folder(root: Path) -> Path:
    """The image folder every case starts from: the good record's image and a good bad/x.png."""
    _png(root / "images" / "ok" / "good.png")
    _png(root / "images" / "bad" / "x.png", size=(9, 7))
    return root / "images"


def records(bad: object, jsonl: bool = False, name: str = "") -> Callable[[Path], Path]:
    """[GOOD, bad] as a JSON array (or JSONL); non-ASCII is written as \\u escapes, as json.dumps does."""
    def write(root: Path) -> Path:
        _folder(root)
        path = root / (name or ("m.jsonl" if jsonl else "m.json"))
        text = "".join(json.dumps(r) + "\n" for r in (GOOD, bad)) if jsonl else json.dumps([GOOD, bad])
        path.write_text(text)
        return path
    return write


def raw(data: bytes, name: str = "m.json") -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        _folder(root)
        (root / name).write_bytes(data)
        return root / name
    return write


def bad(**fields) -> dict:
    record = {"id": "bad", "image": "bad/x.png", "conversations": TURNS}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not DROP}


DROP = object()


def image(make: Callable[[Path], None], relpath: str = "bad/x.png") -> Callable[[Path], Path]:
    """[GOOD, a record whose image is relpath], with make(path) putting the bad thing there."""
    def write(root: Path) -> Path:
        images = _folder(root)
        target = images / relpath
        if target.exists():
            target.unlink()
        make(target)
        path = root / "m.json"
        path.write_text(json.dumps([GOOD, bad(image=relpath)]))
        return path
    return write


def _good_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _loop(path: Path) -> None:
    path.symlink_to(path.with_name("loop.png"))
    path.with_name("loop.png").symlink_to(path.name)


def _outside(path: Path) -> None:
    secret = path.parents[2] / "secret.png"
    _png(secret)
    path.symlink_to(secret)


def _unreadable(path: Path) -> None:
    _png(path)
    path.chmod(0)


def _socket(path: Path) -> None:
    """A listening Unix socket at path (bound from its folder: socket paths are short)."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        server = socket.socket(socket.AF_UNIX)
        server.bind(path.name)
        _SOCKETS.append(server)
    finally:
        os.chdir(here)


_SOCKETS: list[socket.socket] = []


def _array(*items: bytes) -> bytes:
    return b"[" + b",\n".join(items) + b"]"


def _jsonl(*items: bytes) -> bytes:
    return b"".join(item + b"\n" for item in items)


# The corpus -------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    write: Callable[[Path], Path]
    outcome: str
    """"refused", "kept" (every record read as written) or the reason the bad record is set aside for."""
    holds: str = ""
    """Text the refusal or the reject's detail must also hold ("{images}" is the image folder)."""
    line: int | None = None
    """Refusals: the line the error names."""
    unprivileged: bool = False
    """Run as a user that file permissions apply to (root reads everything)."""
    rid: str = "bad"
    """Rejects: the id the reject carries ("#<index>" where the record's own id is unusable)."""
    at: int = 1
    """Rejects: the index of the bad record (the good one is the other of the two)."""
    cfg: ShardConfig = field(default_factory=lambda: SMALL_RUNS)
    """The shard settings the case runs with."""


OBJECT = json.dumps({"data": [GOOD]}, indent=1)
JPEG = _good_bytes()
NOT_CLOSED = json.dumps([GOOD, GOOD], indent=1)[:-2]
UTF8_BAD = json.dumps([GOOD, bad(conversations=[dict(TURNS[0]), {"from": "gpt", "value": "caf@"}])]).encode()
G = json.dumps(GOOD).encode()
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_RECORD = b'{"id": "bad", "image": "bad/x.png", "conversations": ' + DEEP + b"}"
LONG_INT_RECORD = b'{"id": ' + b"7" * 5000 + b', "image": "bad/x.png", "conversations": ' + json.dumps(TURNS).encode() + b"}"
BAD_UTF8_RECORD = json.dumps(bad()).encode().replace(b"A square", b"A squ\xffre")
ZSTD = pa.compress(json.dumps([GOOD]).encode(), codec="zstd", asbytes=True)

CASES = [
    # Whole files: refused before any work, naming the file and the line.
    Case("empty-file", raw(b""), "refused", "holds no records"),
    Case("blank-file", raw(b"\n  \n"), "refused", "holds no records"),
    Case("empty-array", raw(b"[]"), "refused", "holds no records"),
    Case("empty-array-jsonl-name", raw(b" [ ]\n", "m.jsonl"), "refused", "holds no records"),
    Case("json-object", raw(OBJECT.encode()), "refused", "not a JSON record", line=1),
    Case("json-object-one-line", raw(json.dumps(GOOD).encode()), "refused", "one JSON object", line=1),
    Case("array-not-closed", raw(NOT_CLOSED.encode()), "refused", "not closed", line=NOT_CLOSED.count("\n") + 1),
    Case("array-missing-comma", raw(f"[{json.dumps(GOOD)}\n{json.dumps(GOOD)}]".encode()), "refused",
         "expected ',' or ']'", line=2),
    Case("array-bad-token", raw(f"[{json.dumps(GOOD)},\n{{\"id\": tru}}]".encode()), "refused", "Expecting value",
         line=2),
    Case("more-after-array", raw(f"[{json.dumps(GOOD)}]\n\n{json.dumps(GOOD)}\n".encode()), "refused",
         "more after the array", line=3),
    Case("utf16-file", raw(json.dumps([GOOD]).encode("utf-16")), "refused", "UTF-16", line=1),
    Case("utf16-no-bom", raw(json.dumps([GOOD]).encode("utf-16-le")), "refused", "UTF-16", line=1),
    Case("text-file", raw(b"id,image\ngood,ok/good.png\n", "m.csv"), "refused", "not a JSON record", line=1),
    Case("gzip-named-json", raw(gzip.compress(json.dumps([GOOD]).encode())), "refused", "gzip-compressed"),
    Case("zstd-named-json", raw(ZSTD), "refused", "zstd-compressed"),
    Case("mixture-is-a-socket", lambda root: (_folder(root), _socket(root / "m.json"), root / "m.json")[-1],
         "refused", "a socket, not a regular file"),
    Case("mixture-named-pipe", lambda root: (_folder(root), os.mkfifo(root / "m.json"), root / "m.json")[-1],
         "refused", "not a regular file"),
    # Text that is not UTF-8 or not Unicode: the record alone is set aside.
    Case("invalid-utf8-array", raw(UTF8_BAD.replace(b"caf@", b"caf\xe9")), "invalid UTF-8", "byte"),
    Case("invalid-utf8-jsonl", raw(json.dumps(GOOD).encode() + b"\n" + json.dumps(bad()).encode().replace(
         b"A square", b"A squ\xffre") + b"\n", "m.jsonl"), "invalid UTF-8", "invalid start byte"),
    Case("invalid-utf8-jsonl-line-1", raw(_jsonl(BAD_UTF8_RECORD, G), "m.jsonl"), "invalid UTF-8",
         "invalid start byte", at=0),
    Case("surrogate-bytes-jsonl", raw(json.dumps(GOOD).encode() + b"\n" + json.dumps(bad()).encode().replace(
         b"A square", b"A \xed\xa0\x80") + b"\n", "m.jsonl"), "invalid UTF-8"),
    Case("lone-surrogate-array", records(bad(conversations=[TURNS[0], {"from": "gpt", "value": "x \ud800"}])),
         "lone surrogate", "conversations[1].value"),
    Case("lone-surrogate-jsonl", records(bad(conversations=[TURNS[0], {"from": "gpt", "value": "\udfff"}]),
                                         jsonl=True), "lone surrogate", "conversations[1].value"),
    Case("lone-surrogate-image-path", records(bad(image="bad/\ud800.png")), "lone surrogate", "image holds"),
    Case("lone-surrogate-id", records(bad(id="b\ud800d")), "lone surrogate", "id ('b\\ud800d') holds", rid="#1"),
    Case("broken-jsonl-line", raw(json.dumps(GOOD).encode() + b"\n{\"id\": \"bad\", \n", "m.jsonl"),
         "malformed record", "does not parse", rid="#1"),
    # Ids.
    Case("record-not-object", records(7), "malformed record", "not an object but JSON number: 7", rid="#1"),
    Case("null-record", records(None), "malformed record", "not an object but JSON null", rid="#1"),
    Case("null-record-jsonl-line-1", raw(_jsonl(b"null", G), "m.jsonl"), "malformed record", "JSON null", rid="#0",
         at=0),
    Case("no-id", records(bad(id=DROP)), "malformed record", "no id", rid="#1"),
    Case("empty-id", records(bad(id="")), "malformed record", "the id is empty", rid="#1"),
    Case("null-id", records(bad(id=None)), "malformed record", "no id", rid="#1"),
    Case("float-id", records(bad(id=1.5)), "malformed record", "a JSON number", rid="#1"),
    Case("bool-id", records(bad(id=True)), "malformed record", "a JSON boolean", rid="#1"),
    Case("list-id", records(bad(id=["a"])), "malformed record", "a JSON array", rid="#1"),
    Case("long-id", records(bad(id="x" * 5000)), "malformed record", "5000 characters", rid="#1"),
    Case("5000-digit-id-array", raw(_array(G, LONG_INT_RECORD)), "malformed record", "more than 4300 digits",
         rid="#1"),
    Case("5000-digit-id-jsonl", raw(_jsonl(G, LONG_INT_RECORD), "m.jsonl"), "malformed record",
         "more than 4300 digits", rid="#1"),
    # Nested deeper than Python's JSON reader follows: the record alone, wherever it stands.
    Case("deep-record-array", raw(_array(G, DEEP_RECORD)), "malformed record", "nested deeper", rid="#1"),
    Case("deep-record-array-first", raw(_array(DEEP_RECORD, G)), "malformed record", "nested deeper", rid="#0", at=0),
    Case("deep-bare-array-element", raw(_array(G, DEEP)), "malformed record", "nested deeper", rid="#1"),
    Case("deep-record-jsonl", raw(_jsonl(G, DEEP_RECORD), "m.jsonl"), "malformed record", "nested deeper", rid="#1"),
    Case("deep-record-jsonl-line-1", raw(_jsonl(DEEP_RECORD, G), "m.jsonl"), "malformed record", "nested deeper",
         rid="#0", at=0),
    # Conversations.
    Case("wrong-role", records(bad(conversations=[{"from": "robot", "value": "<image>\nhi"}, TURNS[1]])),
         "malformed conversation", "'robot'"),
    Case("user-assistant-roles", records(bad(conversations=[{"from": "user", "value": "<image>\nhi"},
                                                            {"from": "assistant", "value": "yo"}])),
         "malformed conversation", "'user'"),
    Case("not-alternating", records(bad(conversations=[TURNS[0], TURNS[0], TURNS[1], TURNS[1]])),
         "malformed conversation", "turn 1 is from 'human'"),
    Case("missing-value", records(bad(conversations=[TURNS[0], {"from": "gpt"}])), "malformed conversation",
         "has no value"),
    Case("non-string-value", records(bad(conversations=[TURNS[0], {"from": "gpt", "value": 42}])),
         "malformed conversation", "of type int"),
    Case("conversations-not-list", records(bad(conversations="<image>\nhi")), "malformed conversation"),
    Case("turn-not-object", records(bad(conversations=[TURNS[0], "A square."])), "malformed conversation",
         "turn 1 is a str"),
    Case("ends-on-human", records(bad(conversations=TURNS + [{"from": "human", "value": "And?"}])),
         "malformed conversation", "no answer"),
    Case("empty-answer", records(bad(conversations=[TURNS[0], {"from": "gpt", "value": "  "}])), "kept"),
    Case("missing-image-tag", records(bad(conversations=TEXT_TURNS)), "image without <image> tag"),
    Case("two-image-tags", records(bad(conversations=[{"from": "human", "value": "<image><image>\nhi"},
                                                      TURNS[1]])), "misplaced <image> tag", "2 tag(s)"),
    Case("image-tag-in-answer", records(bad(conversations=[TURNS[0], {"from": "gpt", "value": "<image> A dog."}])),
         "misplaced <image> tag", "2 tag(s)"),
    Case("tag-without-image", records(bad(image=DROP)), "<image> tag without image"),
    Case("reply-separator-in-text", records(bad(conversations=[TURNS[0], {"from": "gpt", "value": "a </s> b"}])),
         "template conflict", "</s>"),
    Case("image-int-on-text-record", records(bad(image=7, conversations=TEXT_TURNS)), "malformed record",
         "image is not a path: 7"),
    Case("image-list-on-text-record", records(bad(image=["a.png"], conversations=TEXT_TURNS)), "malformed record",
         "image is not a path"),
    Case("image-empty-string", records(bad(image="", conversations=TEXT_TURNS)), "malformed record"),
    # Image paths and files.
    Case("dotdot-path", records(bad(image="../secret.png")), "path outside image root", "'..'"),
    Case("absolute-path", records(bad(image="/etc/passwd")), "path outside image root", "not a path relative"),
    Case("symlink-out-of-root", image(_outside), "path outside image root", "outside"),
    Case("nul-in-image-path", records(bad(image="bad/x\u0000.png")), BAD_PATH, "NUL character"),
    Case("socket-image", image(_socket), "not a regular file", "is a socket"),
    Case("missing-file", image(lambda p: None), "missing file", "{images}/bad/x.png: does not exist"),
    Case("directory-named-jpg", image(lambda p: p.mkdir(), "bad/x.jpg"), "not a regular file", "is a directory"),
    Case("named-pipe", image(os.mkfifo), "not a regular file", "is a named pipe"),
    Case("symlink-loop", image(_loop), "unreadable file", "a symlink loop"),
    Case("permission-denied", image(_unreadable), "unreadable file", "permission denied", unprivileged=True),
    Case("zero-byte-file", image(lambda p: p.write_bytes(b"")), "empty file", "0 bytes"),
    Case("truncated-png", image(lambda p: p.write_bytes(_png(p, (64, 64))[:70])), "unreadable image"),
    Case("truncated-jpeg", image(lambda p: p.write_bytes(JPEG[: len(JPEG) // 2]), "bad/x.jpg"), "unreadable image",
         "Truncated"),
    Case("not-an-image", image(lambda p: p.write_text("just text")), "unreadable image", "cannot identify"),
    Case("extreme-aspect-1x30000", image(lambda p: _png(p, (1, 30000), "L")), "extreme aspect ratio",
         "1 x 30000 pixels"),
    Case("bomb-144-mpixel", image(lambda p: _bomb_png(p, 12000, 12000)), "image too large", "144000000 pixels"),
    Case("bomb-over-pil-limit", image(lambda p: _bomb_png(p, 20000, 10000)), "image too large",
         "20000 x 10000 = 200000000 pixels, over the cap of 16777216 (shard.max_image_pixels)"),
    Case("over-memory-budget", image(lambda p: _png(p, (40, 30), "RGBA")), "image too large",
         "take 9600 bytes decoded, over the per-image memory budget of 5000 (shard.max_image_bytes)",
         cfg=ShardConfig(rows_per_shard=2, max_image_bytes=5000)),
    # Read correctly.
    Case("bom-array", raw(b"\xef\xbb\xbf" + json.dumps([GOOD, bad()]).encode()), "kept"),
    Case("bom-jsonl", raw(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in (GOOD, bad())).encode(),
                          "m.jsonl"), "kept"),
    Case("crlf-jsonl", raw("".join(json.dumps(r) + "\r\n" for r in (GOOD, bad())).encode(), "m.jsonl"), "kept"),
    Case("duplicate-ids", records(bad(id="good")), "kept"),
    Case("wide-18000x900-png", image(lambda p: _png(p, (18000, 900))), "kept"),
    Case("integer-id", records(bad(id=7)), "kept"),
    Case("null-image-on-text-record", records(bad(image=None, conversations=TEXT_TURNS)), "kept"),
    Case("escaped-non-ascii-path", image(lambda p: _png(p), "bad/caf\u00e9.png"), "kept"),
    Case("utf8-non-ascii-path", lambda root: _utf8_path_case(root), "kept"),
]


def _utf8_path_case(root: Path) -> Path:
    images = _folder(root)
    _png(images / "bad" / "café ü.png")
    path = root / "m.json"
    path.write_text(json.dumps([GOOD, bad(image="bad/café ü.png")], ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_bad_input_is_refused_or_set_aside_by_name(case: Case, tmp_path):
    if case.unprivileged and os.geteuid() == 0:
        root = Path(tempfile.mkdtemp())  # pytest's tmp_path is closed to other users
        root.chmod(0o755)
        try:
            _check(case, root)
        finally:
            shutil.rmtree(root)
    else:
        _check(case, tmp_path)


def _check(case: Case, root: Path) -> None:
    mixture = case.write(root)
    images = root / "images"
    try:
        outcome = _run(lambda: shard_locally(mixture, images, case.cfg), as_nobody=case.unprivileged and os.geteuid() == 0)
    finally:
        while _SOCKETS:
            _SOCKETS.pop().close()
    holds = case.holds.replace("{images}", str(images))
    if case.outcome == "refused":
        assert isinstance(outcome, MixtureError), outcome
        assert str(mixture) in str(outcome) and holds in str(outcome)
        assert case.line is None or f"line {case.line}" in str(outcome), str(outcome)
        return
    assert not isinstance(outcome, BaseException), outcome
    kept, rejects = outcome
    if case.outcome == "kept":
        assert rejects == [] and [s["index"] for s in kept] == [0, 1]
        assert all(s["image_key"] or not s["image_path"] for s in kept)
        return
    assert [(s["index"], s["id"]) for s in kept] == [(1 - case.at, "good")]
    [reject] = rejects
    assert (reject["index"], reject["reason"]) == (case.at, case.outcome)
    place = f"line {case.at + 1}" if mixture.suffix == ".jsonl" else f"record #{case.at}"
    assert reject["detail"].startswith(f"{mixture} {place} (id {reject['id']!r}): "), reject["detail"]
    assert holds in reject["detail"], reject["detail"]
    assert reject["id"] == case.rid


def _run(work: Callable[[], object], as_nobody: bool) -> object:
    """work()'s result or the exception it raised; in a child process as user nobody if asked (so
    file permissions apply); never blocked for long (a named pipe that would hang fails the test)."""
    def alarm(*_):
        raise TimeoutError("blocked: the case hangs")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    try:
        if not as_nobody:
            try:
                return work()
            except (MixtureError, TimeoutError) as err:
                return err
        return _as_nobody(work)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _as_nobody(work: Callable[[], object]) -> object:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, send the outcome back
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                result: object = work()
            except Exception as err:
                result = err
            os.write(write, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def test_the_corpus_covers_at_least_thirty_cases_of_each_kind_of_outcome():
    outcomes = {c.outcome for c in CASES}
    assert len(CASES) >= 30 and {"refused", "kept"} <= outcomes and len(outcomes) >= 12


def test_caps_are_config_fields_and_a_lower_cap_sets_aside_what_the_default_keeps(tmp_path):
    mixture = image(lambda p: _png(p, (300, 20)))(tmp_path)
    kept, rejects = shard_locally(mixture, tmp_path / "images")
    assert rejects == [] and len(kept) == 2
    kept, rejects = shard_locally(mixture, tmp_path / "images", ShardConfig(max_image_pixels=5000))
    assert [r["reason"] for r in rejects] == ["image too large"] and "shard.max_image_pixels" in rejects[0]["detail"]
    kept, rejects = shard_locally(mixture, tmp_path / "images", ShardConfig(max_aspect_ratio=10))
    assert [r["reason"] for r in rejects] == ["extreme aspect ratio"] and "15" in rejects[0]["detail"]
