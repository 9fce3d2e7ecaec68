"""pipelines.storage on local paths: the interface every stage reads and writes through.

S3 goes through the same functions; tests/integration covers it against a moto server.
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage


@pytest.mark.parametrize("uri, expected", [
    ("s3://bucket/run/shards", True),
    ("s3://bucket", True),
    ("/data/run/shards", False),
    ("runs/tiny", False),
    ("file:///data/run", False),
])
def test_is_s3(uri, expected):
    assert storage.is_s3(uri) is expected


def test_join_uses_slashes_on_s3_and_the_os_separator_locally(tmp_path):
    assert storage.join("s3://bucket/run", "shards", "samples-00000.parquet") == \
        "s3://bucket/run/shards/samples-00000.parquet"
    assert storage.join("s3://bucket/run/", "cache") == "s3://bucket/run/cache"
    assert storage.join(str(tmp_path), "shards", "x.parquet") == os.path.join(str(tmp_path), "shards", "x.parquet")


def test_exists_for_files_and_directories(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    assert storage.exists(str(tmp_path / "a.bin"))
    assert storage.exists(str(tmp_path))
    assert not storage.exists(str(tmp_path / "missing.bin"))
    assert not storage.exists(str(tmp_path / "missing" / "deeper"))


def test_makedirs_creates_nested_directories_and_is_idempotent(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    storage.makedirs(str(target))
    assert target.is_dir()
    storage.makedirs(str(target))  # a second run of a job finds it there
    assert target.is_dir()


def test_listdir_names_the_files_with_the_suffix_sorted(tmp_path):
    for name in ["b.parquet", "a.parquet", "c.json", "a.parquet.tmp-1"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.parquet").write_bytes(b"x")

    assert storage.listdir(str(tmp_path), ".parquet") == ["a.parquet", "b.parquet"]
    assert storage.listdir(str(tmp_path), ".json") == ["c.json"]
    everything = storage.listdir(str(tmp_path))
    assert everything == sorted(everything)
    assert {"a.parquet", "b.parquet", "c.json", "a.parquet.tmp-1"} <= set(everything)
    assert "deeper.parquet" not in everything  # only what lies directly under the directory


def test_listdir_of_a_missing_directory_is_empty(tmp_path):
    assert storage.listdir(str(tmp_path / "missing")) == []
    assert storage.listdir(str(tmp_path / "missing"), ".parquet") == []


def test_listdir_sees_a_file_written_after_an_earlier_listing(tmp_path):
    assert storage.listdir(str(tmp_path), ".json") == []
    storage.write_json(str(tmp_path / "done.json"), {})
    assert storage.listdir(str(tmp_path), ".json") == ["done.json"]


def test_write_bytes_creates_parents_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "shards" / "images" / "x.bin"
    storage.write_bytes(str(target), b"\x00\x01payload")
    assert storage.read_bytes(str(target)) == b"\x00\x01payload"
    assert os.listdir(target.parent) == ["x.bin"]


def test_write_bytes_overwrites_whole(tmp_path):
    target = str(tmp_path / "x.bin")
    storage.write_bytes(target, b"a much longer first version")
    storage.write_bytes(target, b"short")
    assert storage.read_bytes(target) == b"short"
    assert storage.size(target) == 5
    assert os.listdir(tmp_path) == ["x.bin"]


def test_write_bytes_to_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes(os.path.join("run", "x.bin"), b"data")
    assert (tmp_path / "run" / "x.bin").read_bytes() == b"data"
    assert storage.exists(os.path.join("run", "x.bin"))
    assert storage.listdir("run") == ["x.bin"]


def test_json_round_trip_and_a_stable_readable_form(tmp_path):
    target = str(tmp_path / "manifest.json")
    data = {"z": [1, 2.5, None], "a": {"name": "café", "ok": True}, "m": "x"}
    storage.write_json(target, data)
    assert storage.read_json(target) == data
    text = storage.read_bytes(target).decode()
    assert text.endswith("}\n") and "\n  " in text  # indented, one trailing newline
    assert text.index('"a"') < text.index('"m"') < text.index('"z"')  # keys sorted: the same data, the same bytes
    storage.write_json(target, dict(reversed(list(data.items()))))
    assert storage.read_bytes(target).decode() == text


def test_parquet_round_trip(tmp_path):
    target = str(tmp_path / "shards" / "samples-00000.parquet")
    table = pa.table({
        "id": ["a", "b", "c"],
        "n": pa.array([1, 2, 3], pa.int64()),
        "scores": [[0.5, 0.25], [], [1.0]],
        "image": [b"\x89PNG", None, b""],
    })
    storage.write_parquet(target, table)
    assert storage.read_parquet(target).equals(table)
    assert storage.read_parquet(target, columns=["id", "n"]).equals(table.select(["id", "n"]))
    assert os.listdir(tmp_path / "shards") == ["samples-00000.parquet"]


def test_parquet_row_groups(tmp_path):
    target = str(tmp_path / "x.parquet")
    table = pa.table({"i": list(range(10))})
    storage.write_parquet(target, table, row_group_size=4)
    assert pq.ParquetFile(target).metadata.num_row_groups == 3
    assert storage.read_parquet(target).equals(table)


def test_remove_a_file_a_directory_and_nothing(tmp_path):
    file = tmp_path / "x.bin"
    file.write_bytes(b"x")
    storage.remove(str(file))
    assert not file.exists()

    directory = tmp_path / "checkpoint_step_00000010"
    (directory / "part").mkdir(parents=True)
    (directory / "part" / "model.pt").write_bytes(b"x")
    (directory / "complete.json").write_bytes(b"{}")
    storage.remove(str(directory))
    assert not directory.exists()

    storage.remove(str(tmp_path / "missing"))  # a missing path is no error
    assert os.listdir(tmp_path) == []


def test_size_in_bytes(tmp_path):
    target = str(tmp_path / "x.bin")
    storage.write_bytes(target, b"12345678")
    assert storage.size(target) == 8
    storage.write_bytes(target, b"")
    assert storage.size(target) == 0


def test_stat_gives_size_and_a_stamp_that_changes_with_a_rewrite(tmp_path):
    target = str(tmp_path / "mix.json")
    storage.write_bytes(target, b"[1, 2]")
    size, stamp = storage.stat(target)
    assert size == 6 and stamp
    os.utime(target, ns=(1, 1))
    assert storage.stat(target) != (size, stamp)
    with pytest.raises(FileNotFoundError):
        storage.stat(str(tmp_path / "missing.json"))


def test_sha256_of_a_file_larger_than_one_read(tmp_path):
    import hashlib

    target = str(tmp_path / "x.bin")
    data = os.urandom(3 * 2**20 + 17)  # hashlib.file_digest reads 256 KiB at a time
    storage.write_bytes(target, data)
    assert storage.sha256(target) == hashlib.sha256(data).hexdigest()


def test_parquet_rows_reads_the_footer(tmp_path):
    target = str(tmp_path / "x.parquet")
    storage.write_parquet(target, pa.table({"i": list(range(7))}))
    assert storage.parquet_rows(target) == 7
    with pytest.raises(FileNotFoundError):
        storage.parquet_rows(str(tmp_path / "missing.parquet"))
