"""Tracking that survives: real MLflow stores (a sqlite file in tmp_path) and an address where no
server listens. Backoff is 0 and the cool-down an hour, so that nothing here depends on timing."""

import logging
import socket

import mlflow
import pytest

from pipelines.tracking import Tracker
from pipelines.tracking_store import check_store_reachable

EXPERIMENT = "trim-llava-test"


def sqlite_uri(tmp_path, name="mlflow.db"):
    return f"sqlite:///{tmp_path / name}"


def dead_uri():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def tracker(uri, **kwargs):
    return Tracker(uri, EXPERIMENT, **{"backoff_s": 0.0, "cooldown_s": 3600.0, **kwargs})


def runs_by_name(uri):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])} if experiment else {}


def warnings_with(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_runs_end_finished_failed_or_killed_with_what_was_logged(tmp_path):
    uri = sqlite_uri(tmp_path)
    with tracker(uri) as t:
        t.start("ok")
        t.log_params({"train": {"lr": 0.1}, "seed": 3})
        t.log_metrics({"loss": 2.5}, step=1)
        t.set_tags({"model_dir": "/models/x"})
    with pytest.raises(RuntimeError), tracker(uri) as t:
        t.start("crashed")
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), tracker(uri) as t:
        t.start("interrupted")
        raise KeyboardInterrupt
    runs = runs_by_name(uri)
    assert {name: r.info.status for name, r in runs.items()} == {
        "ok": "FINISHED", "crashed": "FAILED", "interrupted": "KILLED"}
    assert runs["ok"].data.params == {"train.lr": "0.1", "seed": "3"}
    assert runs["ok"].data.metrics == {"loss": 2.5} and runs["ok"].data.tags["model_dir"] == "/models/x"


def test_an_unreachable_server_is_retried_said_once_and_metrics_skipped_during_the_cooldown(caplog):
    uri = dead_uri()
    with caplog.at_level(logging.INFO, logger="pipelines"), tracker(uri, attempts=3) as t:
        assert t.start("r") is None
        assert t.stats.tries == 3 and t.cooling_down()
        for step in range(1, 6):
            t.log_metrics({"loss": 1.0}, step=step)
        assert t.stats.tries == 3  # metric calls wait out the cool-down
        t.log_params({"lr": 1})
        t.set_tags({"a": "b"})
        assert t.stats.tries == 5  # other calls: one try each while cooling down
    (warning,) = warnings_with(caplog, "going on without tracking")
    assert uri in warning and "start run" in warning
    assert t.stats.skipped == 7 and t.run_id is None


def test_a_server_that_stays_down_gets_one_try_per_call_once_the_cooldown_is_over():
    with tracker(dead_uri(), attempts=3, cooldown_s=0.0) as t:  # a cool-down that is always over
        t.start("r")
        for step in range(1, 4):
            t.log_metrics({"loss": 1.0}, step=step)
    assert t.stats.tries == 3 + 3 and t.stats.skipped == 3


def test_a_run_that_could_not_start_starts_with_the_next_call_that_gets_through(tmp_path, caplog):
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store's folder should be")  # the store cannot be opened
    uri = sqlite_uri(blocker)
    with caplog.at_level(logging.INFO, logger="pipelines"), tracker(uri, attempts=2) as t:
        assert t.start("late") is None
        t.log_params({"lr": 0.1})
        blocker.unlink()  # the store is back
        t.log_metrics({"loss": 3.0}, step=1)  # still in the cool-down: skipped
        t.log_params({"seed": 7})  # gets through: starts the run, with the params kept so far
        assert t.run_id is not None and not t.cooling_down()
        t.log_metrics({"loss": 2.0}, step=2)
    run = runs_by_name(uri)["late"]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1", "seed": "7"}
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 2.0)]
    assert len(warnings_with(caplog, "going on without tracking")) == 1
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_refused_call_is_not_retried_and_tracking_goes_on(tmp_path, caplog):
    uri = sqlite_uri(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipelines"), tracker(uri) as t:
        t.start("refused")
        t.log_params({"lr": 0.1})
        tries = t.stats.tries
        t.log_params({"lr": 0.2})  # MLflow refuses to change a param
        t.log_artifact(str(tmp_path / "missing.txt"))  # no such file
        assert t.stats.tries == tries + 2 and not t.cooling_down()
        t.log_metrics({"loss": 1.5}, step=1)
    run = runs_by_name(uri)["refused"]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 1.5}
    assert len(warnings_with(caplog, "refused")) == 2 and not warnings_with(caplog, "going on without tracking")


def test_a_run_left_running_by_a_dead_process_is_failed_and_resumed_as_the_same_run(tmp_path):
    uri = sqlite_uri(tmp_path)
    abandoned = tracker(uri)  # its process "dies": the run is never ended
    run_id = abandoned.start("train")
    assert runs_by_name(uri)["train"].info.status == "RUNNING"
    assert Tracker(uri, EXPERIMENT).fail_unfinished("train") == 1
    assert runs_by_name(uri)["train"].info.status == "FAILED"
    assert Tracker(uri, EXPERIMENT).fail_unfinished("train") == 0
    with tracker(uri) as resumed:
        assert resumed.start("train", run_id) == run_id
        assert runs_by_name(uri)["train"].info.status == "RUNNING"
    assert runs_by_name(uri)["train"].info.status == "FINISHED"
    with tracker(uri) as elsewhere:  # a checkpoint's run id from another store: a new run
        assert elsewhere.start("train2", "0" * 32) not in (None, run_id)


def test_secrets_never_reach_params_tags_or_logged_dicts(tmp_path, monkeypatch):
    sentinel = "sentinel-7f3a9c-secret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sentinel)
    uri = sqlite_uri(tmp_path)
    with tracker(uri) as t:
        t.start("secrets")
        t.log_params({"paths": {"root": f"s3://bucket/{sentinel}"}, "mlflow": "https://alice:pw123@mlflow.example"})
        t.set_tags({"note": f"key {sentinel}"})
        t.log_dict({"nested": [f"x{sentinel}"]}, "d.json")
    run = runs_by_name(uri)["secrets"]
    assert run.data.params == {"paths.root": "s3://bucket/***", "mlflow": "https://***@mlflow.example"}
    assert run.data.tags["note"] == "key ***"
    text = "".join(p.read_text() for p in tmp_path.rglob("d.json"))
    assert text and sentinel not in text


def test_a_disabled_tracker_touches_no_store(tmp_path):
    uri = sqlite_uri(tmp_path)
    with tracker(uri, enabled=False) as t:
        assert t.start("rank1") is None
        t.log_metrics({"loss": 1.0}, step=1)
    assert not list(tmp_path.iterdir()) and t.stats.tries == 0


@pytest.mark.parametrize("uri, nodes, refused", [
    ("sqlite:////runs/mlflow.db", 2, True), ("sqlite:////runs/mlflow.db", 1, False),
    ("file:///runs/mlruns", 3, True), ("/runs/mlruns", 2, True),
    ("http://mlflow.example:5000", 8, False), ("https://mlflow.example", 2, False),
])
def test_a_store_on_one_nodes_disk_is_refused_for_a_run_on_several_nodes(uri, nodes, refused):
    if not refused:
        check_store_reachable(uri, nodes)
        return
    with pytest.raises(ValueError, match=f"{nodes} nodes.*MLFLOW_TRACKING_URI"):
        check_store_reachable(uri, nodes)


def test_many_steps_of_metrics_go_in_few_requests_and_keep_their_steps(tmp_path):
    from pipelines.train.worker import MetricsLog

    uri = sqlite_uri(tmp_path)
    with tracker(uri) as t:
        t.start("batched")
        log = MetricsLog(t)
        tries_before = t.stats.tries
        for step in range(1, 251):
            log.add(step, {"loss": 1.0 / step, "lr": 0.1}, flush=step == 250)
        # One flush of 250 steps, in requests of at most 100 steps (MLflow's limit is 1000 values).
        assert t.stats.tries - tries_before == 3
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(runs_by_name(uri)["batched"].info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 251)]


def test_a_steps_time_leaves_out_the_checkpoint_saved_after_the_step_before():
    from pipelines.train.worker import Progress

    now = [100.0]
    progress = Progress(clock=lambda: now[0], started=100.0, step_started=100.0)
    now[0] = 101.0
    assert progress.step_metrics(1.0, 0.1, world=2)["step_time_s"] == 1.0
    now[0] = 131.0  # a checkpoint took 30 s
    progress.start_step()
    now[0] = 132.5
    metrics = progress.step_metrics(1.0, 0.1, world=2)
    assert metrics["step_time_s"] == 1.5
    assert progress.steps_here == 2 and progress.started == 100.0  # throughput still counts from the start
