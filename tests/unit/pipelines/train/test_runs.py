"""Runs named after their cache: the name, the retention rule, and what a rerun does with a run's
newest checkpoint (nothing when complete, a refusal on another cache)."""

import json
from pathlib import Path

import pytest

from pipelines.config import PathsConfig, TrainConfig
from pipelines.manifests import CURRENT_FILE
from pipelines.train.identity import run_identity
from pipelines.train.plan import StepPlan, TrainJob
from pipelines.train.run_names import cache_version_of_run, expand_run_name
from pipelines.train.runs import already_complete, check_resume, remove_superseded_runs

V1, V2, V3 = "v-111111111111", "v-222222222222", "v-333333333333"
TEMPLATE = "llava-1.5-7b-trim-{cache_version}"


def test_a_run_name_holds_the_cache_version_once_or_not_at_all():
    assert expand_run_name(TEMPLATE, V1) == f"llava-1.5-7b-trim-{V1}"
    assert expand_run_name("plain", "") == "plain"
    for bad in ("run-{cache}", "{cache_version}-{cache_version}", "run-{"):
        with pytest.raises(ValueError, match="placeholder"):
            expand_run_name(bad, V1)
    with pytest.raises(ValueError, match="not a cache version"):
        expand_run_name(TEMPLATE, "")
    assert cache_version_of_run(TEMPLATE, f"llava-1.5-7b-trim-{V2}") == V2
    for other in ("llava-1.5-7b-trim", f"other-{V2}", "llava-1.5-7b-trim-v-12", f"llava-1.5-7b-trim-{V2}-x"):
        assert cache_version_of_run(TEMPLATE, other) is None
    assert cache_version_of_run("plain", "plain") is None


def test_runs_are_kept_while_their_cache_version_is(tmp_path):
    paths = PathsConfig(root=str(tmp_path))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CURRENT_FILE).write_text(json.dumps({"version": V3, "history": [V3, V2]}))
    names = [f"llava-1.5-7b-trim-{v}" for v in (V1, V2, V3)] + ["llava-1.5-7b-trim", f"other-{V1}"]
    for name in names:
        (tmp_path / "checkpoints" / name / "model").mkdir(parents=True)
    assert remove_superseded_runs(TEMPLATE, paths, V3) == [f"llava-1.5-7b-trim-{V1}"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(names[1:])
    # The version just trained on stays even when the cache no longer lists it.
    assert remove_superseded_runs(TEMPLATE, PathsConfig(root=str(tmp_path / "elsewhere")), V1) == []


def _job(tmp_path, version=V1, **train) -> TrainJob:
    cfg = TrainConfig(num_workers=2, max_steps=4, **train)
    manifest = {"version": version, "encoder": {"path": "clip"}, "trim": {}, "samples": 64, "cache_bytes": 10}
    run_dir = tmp_path / "checkpoints" / "run"
    plan = StepPlan(samples=64, micro_batches_per_epoch=16, steps_per_epoch=16.0, total_steps=4, warmup_steps=0,
                    global_batch=8)
    return TrainJob(train=cfg, plan=plan, llm="llm", projector="", feature_dim=8, deepspeed={},
                    model_settings={}, tracking_uri="", experiment="", recipe={}, cache_manifest=manifest,
                    run_dir=str(run_dir), export_dir=str(run_dir / "model"), registered_model="",
                    identity=run_identity(cfg, manifest, "llm", ""))


def _checkpoint(job: TrainJob, step: int) -> str:
    folder = Path(job.run_dir) / f"checkpoint_step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "complete.json").write_text(json.dumps({"step": step, "identity": {**job.identity, "workers": 2}}))
    return str(folder)


def test_a_complete_run_on_the_same_cache_needs_nothing_and_another_cache_is_refused(tmp_path):
    job = _job(tmp_path)
    last = _checkpoint(job, 4)
    assert already_complete(job, last) is None  # no model exported yet
    (tmp_path / "checkpoints" / "run" / "model").mkdir()
    (tmp_path / "checkpoints" / "run" / "model" / "trim_llava.json").write_text("{}")
    assert already_complete(job, last)["step"] == 4
    assert already_complete(job, None) is None  # no checkpoint
    assert already_complete(_job(tmp_path, start_fresh=True), last) is None
    assert already_complete(_job(tmp_path, V2), last) is None  # complete, but on another cache
    longer = _job(tmp_path)
    longer.plan.total_steps = 8  # max_steps raised: the run goes on
    assert already_complete(longer, last) is None

    check_resume(job, last)
    check_resume(_job(tmp_path, V2, start_fresh=True), last)
    with pytest.raises(RuntimeError, match=f"differ: cache.version.*trained on {V1}, the current cache is {V2}"):
        check_resume(_job(tmp_path, V2), last)
    with pytest.raises(RuntimeError, match=r"differ: train.lr\)"):
        check_resume(_job(tmp_path, lr=0.5), last)


def _checkpoint_without(part, job, step, micro_in_epoch):
    """A checkpoint written before `part` of the identity was recorded."""
    folder = Path(_checkpoint(job, step))
    state = json.loads((folder / "complete.json").read_text())
    del state["identity"][part]
    (folder / "complete.json").write_text(json.dumps(dict(state, micro_in_epoch=micro_in_epoch)))
    return str(folder)


def test_a_packed_run_checkpointed_mid_epoch_under_the_old_order_is_refused_saying_why(tmp_path):
    def old_checkpoint(job, step, micro_in_epoch):
        return _checkpoint_without("order", job, step, micro_in_epoch)

    packed = _job(tmp_path / "packed")
    with pytest.raises(RuntimeError, match=r"differ: order\).*order's rules changed"):
        check_resume(packed, old_checkpoint(packed, 2, micro_in_epoch=3))
    # At an epoch's end (the loop saves it with all of the epoch's micro-batches counted) the next epoch is
    # ordered anew: nothing to mix.
    epoch = _job(tmp_path / "epoch")
    check_resume(epoch, old_checkpoint(epoch, 2, micro_in_epoch=epoch.plan.micro_batches_per_epoch))
    # A finished run is still finished (the scheduled rerun on the same cache trains nothing).
    done = _job(tmp_path / "done")
    last = old_checkpoint(done, 4, micro_in_epoch=3)
    (Path(done.export_dir) / "trim_llava.json").parent.mkdir(parents=True)
    (Path(done.export_dir) / "trim_llava.json").write_text("{}")
    assert already_complete(done, last)["step"] == 4
    check_resume(done, last)
    padded = _job(tmp_path / "padded", packing=False)  # its steps are now random draws too
    with pytest.raises(RuntimeError, match=r"differ: order\).*order's rules changed"):
        check_resume(padded, old_checkpoint(padded, 2, micro_in_epoch=3))
    plain = _job(tmp_path / "plain", group_by_length=False)
    check_resume(plain, old_checkpoint(plain, 2, micro_in_epoch=3))  # a plain shuffle, as then


def test_a_run_checkpointed_under_the_old_schedule_is_refused_saying_why_unless_it_is_finished(tmp_path):
    def old_checkpoint(job, step, micro_in_epoch):
        return _checkpoint_without("schedule", job, step, micro_in_epoch)

    job = _job(tmp_path / "mid")
    with pytest.raises(RuntimeError, match=r"differ: schedule\).*learning-rate schedule's rules changed"):
        check_resume(job, old_checkpoint(job, 2, micro_in_epoch=3))
    epoch_end = _job(tmp_path / "epoch")  # the next epoch still runs on the schedule: refused there too
    with pytest.raises(RuntimeError, match=r"differ: schedule\)"):
        check_resume(epoch_end, old_checkpoint(epoch_end, 2, micro_in_epoch=epoch_end.plan.micro_batches_per_epoch))
    done = _job(tmp_path / "done")
    last = old_checkpoint(done, 4, micro_in_epoch=3)
    check_resume(done, last)  # nothing is left to schedule
