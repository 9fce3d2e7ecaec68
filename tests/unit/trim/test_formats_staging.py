"""Exports replace the folder they write to only when complete: a failure or a kill at any point
leaves the old folder (or, cut between the two renames, both beside it for the next writer)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from trim.formats import detect_layout, export_model, load_llava_trim
from trim.staging import settle, staged_dir


def listing(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(dest):
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + "."))


def old_folder(tmp_path):
    dest = tmp_path / "model"
    (dest / "llm").mkdir(parents=True)
    (dest / "llm" / "weights.bin").write_bytes(b"old weights")
    (dest / "trim_llava.json").write_text('{"old": true}')
    return dest, listing(dest)


def test_an_error_mid_write_leaves_the_old_folder(tmp_path):
    dest, before = old_folder(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        with staged_dir(dest) as staged:
            (staged / "llm").mkdir()
            (staged / "llm" / "weights.bin").write_bytes(b"half")
            raise OSError("disk full")
    assert listing(dest) == before and leftovers(dest) == []


def test_a_complete_write_replaces_the_old_folder_whole(tmp_path):
    dest, _ = old_folder(tmp_path)
    with staged_dir(dest) as staged:
        (staged / "trim_llava.json").write_text('{"new": true}')
    assert listing(dest) == {"trim_llava.json": b'{"new": true}'}  # no old file left in
    assert leftovers(dest) == []
    with staged_dir(tmp_path / "fresh" / "model") as staged:  # nothing there before
        (staged / "a").write_text("a")
    assert listing(tmp_path / "fresh" / "model") == {"a": b"a"}


def test_a_writer_killed_mid_write_leaves_the_old_folder_and_the_next_one_cleans_up(tmp_path):
    dest, before = old_folder(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal
        from trim.staging import staged_dir
        with staged_dir({str(dest)!r}) as staged:
            (staged / "trim_llava.json").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -9
    assert listing(dest) == before
    assert len(leftovers(dest)) == 1 and leftovers(dest)[0].startswith("model.tmp-")
    with staged_dir(dest) as staged:
        (staged / "trim_llava.json").write_text("new")
    assert listing(dest) == {"trim_llava.json": b"new"} and leftovers(dest) == []


def test_a_switch_cut_between_its_renames_is_completed_by_the_next_writer(tmp_path):
    dest, before = old_folder(tmp_path)
    new = tmp_path / "model.tmp-1-aa"
    new.mkdir()
    (new / "trim_llava.json").write_text("new")
    dest.rename(tmp_path / "model.old-1-aa")  # killed here: the new folder was complete
    settle(dest)
    assert listing(dest) == {"trim_llava.json": b"new"} and leftovers(dest) == []
    dest.rename(tmp_path / "model.old-2-bb")  # only the old one aside (nothing newer was complete)
    settle(dest)
    assert listing(dest) == {"trim_llava.json": b"new"} and leftovers(dest) == []


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    torch.manual_seed(0)
    model = load_llava_trim(tiny_models.llm, feature_dim=64,
                               settings={"encoder": {"path": str(tiny_models.clip), "layer": -2}})
    return model.save(tmp_path_factory.mktemp("model"), tokenizer=AutoTokenizer.from_pretrained(str(tiny_models.llm)))


def test_an_export_that_fails_mid_write_leaves_the_previous_export(model_dir, tmp_path, monkeypatch):
    import trim.formats.llava

    out = export_model(model_dir, tmp_path / "llava-tiny", "llava")
    before = listing(out)

    def fail_half_way(state, directory):
        (tmp_path / "seen").write_text(directory)
        open(f"{directory}/model.safetensors", "wb").write(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(trim.formats.llava, "save_torch_state_dict", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        export_model(model_dir, out, "llava", clip="another/clip")
    assert (tmp_path / "seen").read_text() != str(out)  # it wrote elsewhere
    assert listing(out) == before and detect_layout(out) == "llava" and leftovers(out) == []
