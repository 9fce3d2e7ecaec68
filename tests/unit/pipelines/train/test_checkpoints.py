"""Checkpoint names, the choice of checkpoint to resume from, what is cleaned up, and the digests a
checkpoint must match before it is loaded."""

import json
import logging

import pytest

from pipelines.train import checkpoints
from pipelines.train.checkpoint_digests import digest_tree
from pipelines.train.plan import TrainState


def _checkpoint(run_dir, step, complete):
    """A checkpoint folder as save() leaves it: the ranks' files, then (complete) digests and marker."""
    directory = run_dir / checkpoints.dir_name(step)
    (directory / "engine").mkdir(parents=True)
    (directory / "train_state.json").write_text(json.dumps({"step": step}))
    (directory / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
    for rank in (0, 1):
        (directory / "engine" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([rank]) * 50)
    if complete:
        _record_digests(directory)
        (directory / checkpoints.COMPLETE_FILE).write_text(json.dumps({"step": step}))
    return directory


def _record_digests(directory):
    ranks_files = digest_tree(directory)
    for name in (checkpoints.DIGESTS_FILE, checkpoints.COMPLETE_FILE):
        ranks_files.pop(name, None)
    digests = checkpoints.merge([ranks_files])
    (directory / checkpoints.DIGESTS_FILE).write_text(json.dumps({"algorithm": "sha256", "files": digests}))


class Engine:  # stands in for a DeepSpeed engine: the checkpoint files are what is under test
    def __init__(self):
        self.loaded = []

    def load_checkpoint(self, directory, tag):
        self.loaded.append(directory)


def said(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "pipelines.train.checkpoints"]


def test_checkpoint_names_sort_by_step_and_parse_back():
    names = [checkpoints.dir_name(s) for s in (12, 4, 100)]
    assert sorted(names) == [checkpoints.dir_name(s) for s in (4, 12, 100)]
    assert [checkpoints.step_of(n) for n in names] == [12, 4, 100]
    assert checkpoints.step_of("checkpoint_manager_snapshot.json") is None and checkpoints.step_of("model") is None


def test_resume_point_is_the_newest_complete_checkpoint_registered_or_not(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.train.checkpoints")
    run_dir = tmp_path / "run"
    assert checkpoints.find_resume_point(str(run_dir)) is None  # a new run
    _checkpoint(run_dir, 4, complete=True)
    _checkpoint(run_dir, 8, complete=True)
    _checkpoint(run_dir, 12, complete=False)  # killed while uploading
    (run_dir / checkpoints.RAY_SNAPSHOT_FILE).write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": checkpoints.dir_name(4)}]}))
    assert checkpoints.find_resume_point(str(run_dir)) == str(run_dir / checkpoints.dir_name(8))
    # Ray Train's own checkpoint stays (it deletes those itself); the unfinished newer one is left to be
    # overwritten when the run gets there again.
    assert sorted(p.name for p in run_dir.glob("checkpoint_step_*")) == [checkpoints.dir_name(s) for s in (4, 8, 12)]
    assert said(caplog) == []


def test_resume_point_removes_unregistered_checkpoints_it_passes_over(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.train.checkpoints")
    run_dir = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run_dir, step, complete=True)
    _checkpoint(run_dir, 2, complete=False)
    assert checkpoints.find_resume_point(str(run_dir)) == str(run_dir / checkpoints.dir_name(8))
    assert [p.name for p in run_dir.glob("checkpoint_step_*")] == [checkpoints.dir_name(8)]
    assert len(said(caplog)) == 2 and all("never registered" in line for line in said(caplog))


def test_an_unreadable_ray_snapshot_keeps_every_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.train.checkpoints")
    run_dir = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run_dir, step, complete=True)
    (run_dir / checkpoints.RAY_SNAPSHOT_FILE).write_text("{not json")
    assert checkpoints.find_resume_point(str(run_dir)) == str(run_dir / checkpoints.dir_name(8))
    assert len(list(run_dir.glob("checkpoint_step_*"))) == 2
    assert len(said(caplog)) == 1 and checkpoints.RAY_SNAPSHOT_FILE in said(caplog)[0]


def test_a_checkpoint_that_cannot_be_loaded_is_named(tmp_path):
    directory = str(_checkpoint(tmp_path, 4, complete=True))
    assert checkpoints.load(Engine(), directory, directory) == TrainState(step=4)
    (tmp_path / checkpoints.dir_name(4) / "train_state.json").write_text("{truncated")
    _record_digests(tmp_path / checkpoints.dir_name(4))  # bad when it was saved: the digests agree
    with pytest.raises(RuntimeError, match=f"cannot resume from checkpoint {directory}.*Delete that folder"):
        checkpoints.load(Engine(), directory, directory)


def test_an_untouched_checkpoint_loads(tmp_path):
    directory = _checkpoint(tmp_path, 4, complete=True)
    engine = Engine()
    assert checkpoints.load(engine, str(directory), "s3://b/run/x", ranks={0}) == TrainState(step=4)
    assert engine.loaded == [str(directory)]
    assert checkpoints.untrusted(directory) is None


@pytest.mark.parametrize("name", ["engine/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                  "engine/mp_rank_00_model_states.pt", "train_state.json"])
def test_a_tampered_file_refuses_the_checkpoint_naming_the_file(tmp_path, name):
    directory = _checkpoint(tmp_path, 4, complete=True)
    with open(directory / name, "r+b") as f:  # same size, one byte changed
        f.write(b"X")
    engine = Engine()
    with pytest.raises(checkpoints.UntrustedCheckpoint,
                       match=f"refusing to load checkpoint {directory}: {name} does not match the SHA-256"):
        checkpoints.load(engine, str(directory), str(directory))
    assert engine.loaded == []  # refused before DeepSpeed unpickled anything


def test_an_unlisted_file_refuses_the_checkpoint(tmp_path):
    directory = _checkpoint(tmp_path, 4, complete=True)
    (directory / "engine" / "zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    engine = Engine()
    with pytest.raises(checkpoints.UntrustedCheckpoint,
                       match="engine/zero_pp_rank_7_mp_rank_00_optim_states.pt is not listed in digests.json"):
        checkpoints.load(engine, str(directory), str(directory), ranks={0})
    assert engine.loaded == []
    (directory / "engine" / "zero_pp_rank_7_mp_rank_00_optim_states.pt").unlink()
    (directory / "engine" / "link.pt").symlink_to(directory / "train_state.json")  # only regular files count
    assert checkpoints.untrusted(directory) == "engine/link.pt is not listed in digests.json"


def test_a_missing_file_or_missing_digests_refuse_the_checkpoint(tmp_path):
    directory = _checkpoint(tmp_path, 4, complete=True)
    (directory / "engine" / "mp_rank_00_model_states.pt").unlink()
    assert checkpoints.untrusted(directory) == ("engine/mp_rank_00_model_states.pt is listed in digests.json "
                                                "but missing")
    unmarked = _checkpoint(tmp_path, 8, complete=False)  # killed before the digests, or written before them
    with pytest.raises(checkpoints.UntrustedCheckpoint, match="it has no digests.json"):
        checkpoints.load(Engine(), str(unmarked), str(unmarked))
    (unmarked / checkpoints.DIGESTS_FILE).write_text('{"files": ["not", "a", "mapping"]}')
    assert "digests.json cannot be read" in checkpoints.untrusted(unmarked)


def test_a_rank_checks_the_shared_files_and_its_own_shards(tmp_path):
    directory = _checkpoint(tmp_path, 4, complete=True)
    (directory / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"changed")
    assert checkpoints.untrusted(directory, ranks={0}) is None  # rank 1's shard is rank 1's to check
    assert "zero_pp_rank_1_" in checkpoints.untrusted(directory, ranks={1})


def test_digests_of_all_ranks_merge_and_a_conflict_is_an_error():
    assert checkpoints.merge([{"b": "2", "latest": "1"}, {"a": "3", "latest": "1"}]) == {"a": "3", "b": "2",
                                                                                        "latest": "1"}
    with pytest.raises(RuntimeError, match="checkpoint file latest was written by several ranks"):
        checkpoints.merge([{"latest": "1"}, {"latest": "2"}])


def test_a_node_downloads_the_shared_files_and_only_its_own_ranks_shards():
    names = ["train_state.json", "engine/latest", "latest", "engine/mp_rank_00_model_states.pt",
             *(f"engine/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)),
             *(f"engine/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)),
             *(f"engine/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(4))]
    mine = checkpoints.files_for_ranks(names, {2, 3})
    assert {"train_state.json", "engine/latest", "latest", "engine/mp_rank_00_model_states.pt"} <= set(mine)
    shards = [n for n in mine if "zero_pp_rank_" in n]
    assert len(shards) == 6 and all("_rank_2_" in n or "_rank_3_" in n for n in shards)
    assert "engine/zero_pp_rank_12_mp_rank_00_optim_states.pt" not in checkpoints.files_for_ranks(
        ["engine/zero_pp_rank_12_mp_rank_00_optim_states.pt"], {1, 2})
