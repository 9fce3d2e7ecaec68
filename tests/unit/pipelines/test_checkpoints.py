"""Checkpoint names, the choice of checkpoint to resume from, and what is cleaned up."""

import json
import logging

import pytest

from pipelines import checkpoints
from pipelines.train_plan import TrainState


def _checkpoint(run_dir, step, complete):
    directory = run_dir / checkpoints.dir_name(step)
    directory.mkdir(parents=True)
    (directory / "train_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (directory / checkpoints.COMPLETE_FILE).write_text(json.dumps({"step": step}))


def said(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "pipelines.checkpoints"]


def test_checkpoint_names_sort_by_step_and_parse_back():
    names = [checkpoints.dir_name(s) for s in (12, 4, 100)]
    assert sorted(names) == [checkpoints.dir_name(s) for s in (4, 12, 100)]
    assert [checkpoints.step_of(n) for n in names] == [12, 4, 100]
    assert checkpoints.step_of("checkpoint_manager_snapshot.json") is None and checkpoints.step_of("model") is None


def test_resume_point_is_the_newest_complete_checkpoint_registered_or_not(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.checkpoints")
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
    caplog.set_level(logging.INFO, logger="pipelines.checkpoints")
    run_dir = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run_dir, step, complete=True)
    _checkpoint(run_dir, 2, complete=False)
    assert checkpoints.find_resume_point(str(run_dir)) == str(run_dir / checkpoints.dir_name(8))
    assert [p.name for p in run_dir.glob("checkpoint_step_*")] == [checkpoints.dir_name(8)]
    assert len(said(caplog)) == 2 and all("never registered" in line for line in said(caplog))


def test_an_unreadable_ray_snapshot_keeps_every_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.checkpoints")
    run_dir = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run_dir, step, complete=True)
    (run_dir / checkpoints.RAY_SNAPSHOT_FILE).write_text("{not json")
    assert checkpoints.find_resume_point(str(run_dir)) == str(run_dir / checkpoints.dir_name(8))
    assert len(list(run_dir.glob("checkpoint_step_*"))) == 2
    assert len(said(caplog)) == 1 and checkpoints.RAY_SNAPSHOT_FILE in said(caplog)[0]


def test_a_checkpoint_that_cannot_be_loaded_is_named(tmp_path):
    class Engine:  # stands in for a DeepSpeed engine: the checkpoint files are what is under test
        def load_checkpoint(self, directory, tag):
            return directory, tag

    _checkpoint(tmp_path, 4, complete=True)
    directory = str(tmp_path / checkpoints.dir_name(4))
    assert checkpoints.load(Engine(), directory, directory) == TrainState(step=4)
    (tmp_path / checkpoints.dir_name(4) / "train_state.json").write_text("{truncated")
    with pytest.raises(RuntimeError, match=f"cannot resume from checkpoint {directory}.*Delete that folder"):
        checkpoints.load(Engine(), directory, directory)


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
