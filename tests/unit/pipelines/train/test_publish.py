"""Publishing a model folder to object storage in an order that never leaves a mix a reader would take
for a model (fsspec's in-memory filesystem stands in for S3: the same calls, no rename)."""

from __future__ import annotations

import fsspec
import pytest

from pipelines.train.publish import MARKER, publish_remote, settle_remote


@pytest.fixture()
def fs():
    memory = fsspec.filesystem("memory")
    memory.store.clear()
    memory.pseudo_dirs.clear()
    memory.pseudo_dirs.append("")
    return memory


def local_model(path, tag, extra=()):
    (path / "llm").mkdir(parents=True)
    (path / "llm" / "model.safetensors").write_text(f"{tag} weights")
    for name in extra:
        (path / name).write_text(tag)
    (path / MARKER).write_text(tag)
    return path


def remote(fs, root):
    return {p[len(root) + 1:]: fs.cat_file(p).decode() for p in fs.find(root)}


DEST = "/bucket/run/model"


def test_publish_replaces_the_model_and_leaves_nothing_beside_it(fs, tmp_path):
    publish_remote(fs, local_model(tmp_path / "a", "old", extra=["stale.bin"]), DEST)
    publish_remote(fs, local_model(tmp_path / "b", "new"), DEST)
    assert remote(fs, DEST) == {"llm/model.safetensors": "new weights", MARKER: "new"}
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/run", detail=False)] == ["model"]


def test_a_failed_upload_leaves_the_old_model(fs, tmp_path, monkeypatch):
    publish_remote(fs, local_model(tmp_path / "a", "old"), DEST)
    monkeypatch.setattr(fs, "put_file", lambda *a, **k: (_ for _ in ()).throw(OSError("connection reset")))
    with pytest.raises(OSError, match="connection reset"):
        publish_remote(fs, local_model(tmp_path / "b", "new"), DEST)
    assert remote(fs, DEST) == {"llm/model.safetensors": "old weights", MARKER: "old"}


def test_a_switch_cut_short_is_no_model_until_the_next_publish_completes_it(fs, tmp_path, monkeypatch):
    publish_remote(fs, local_model(tmp_path / "a", "old"), DEST)
    copy = fs.copy

    def copy_until_marker(source, target, **kwargs):
        if target.endswith(MARKER):
            raise OSError("killed")
        copy(source, target, **kwargs)

    monkeypatch.setattr(fs, "copy", copy_until_marker)
    with pytest.raises(OSError, match="killed"):
        publish_remote(fs, local_model(tmp_path / "b", "new"), DEST)
    assert MARKER not in remote(fs, DEST)  # readers refuse it ("no model"), never read a mix as one
    monkeypatch.setattr(fs, "copy", copy)
    settle_remote(fs, DEST)
    assert remote(fs, DEST) == {"llm/model.safetensors": "new weights", MARKER: "new"}
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/run", detail=False)] == ["model"]


def test_a_folder_without_the_marker_is_not_published(fs, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights").write_text("w")
    with pytest.raises(ValueError, match=f"not a model folder \\(no {MARKER}\\)"):
        publish_remote(fs, tmp_path / "x", DEST)
