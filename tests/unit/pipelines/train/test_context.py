"""The worker's surroundings without Ray: checkpoints land where Ray Train puts them, metrics are kept."""

from pipelines.config import TrainConfig
from pipelines.train.context import LocalContext, RecordingTracker
from pipelines.train.plan import StepPlan, TrainJob


def _job(tmp_path) -> TrainJob:
    plan = StepPlan(samples=4, micro_batches_per_epoch=1, steps_per_epoch=1.0, total_steps=2, warmup_steps=0,
                    global_batch=4)
    return TrainJob(train=TrainConfig(), plan=plan, llm="", projector="", feature_dim=8, deepspeed={},
                    model_settings={}, tracking_uri="", experiment="x", recipe={}, cache_manifest={},
                    run_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "run" / "model"), registered_model="",
                    identity={})


def test_a_reported_checkpoint_is_moved_into_the_run_folder_under_its_name(tmp_path):
    context = LocalContext(str(tmp_path / "run"))
    for rank in (0, 1):  # two ranks' files merge into one checkpoint folder
        source = tmp_path / f"rank{rank}"
        (source / "engine").mkdir(parents=True)
        (source / "engine" / f"zero_pp_rank_{rank}_states.pt").write_text(str(rank))
        if rank == 0:
            (source / "train_state.json").write_text("{}")
        context.report({"loss": 1.5}, str(source), "checkpoint_step_00000002")
        assert not any(p.is_file() for p in source.rglob("*"))
    folder = tmp_path / "run" / "checkpoint_step_00000002"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "engine/zero_pp_rank_0_states.pt", "engine/zero_pp_rank_1_states.pt", "train_state.json"]
    assert context.reports == [("checkpoint_step_00000002", {"loss": 1.5})] * 2
    assert context.registered_checkpoint() is None
    assert (context.world_rank(), context.world_size(), context.local_rank()) == (0, 1, 0)


def test_the_local_tracker_keeps_every_step_and_sends_nothing(tmp_path):
    context = LocalContext(str(tmp_path / "run"))
    with context.tracker(_job(tmp_path), is_master=True) as tracker:
        assert isinstance(tracker, RecordingTracker)
        assert tracker.start("run") is None and tracker.run_id is None
        tracker.log_metric_steps([(1, {"loss": 2.0}), (2, {"loss": 1.0})])
        tracker.log_metric_steps([(3, {"loss": 0.5})])
    assert context.trackers[0].steps == [(1, {"loss": 2.0}), (2, {"loss": 1.0}), (3, {"loss": 0.5})]
