"""Fine-tuning through the real stack: Ray Train workers, DeepSpeed on CPU (gloo), MLflow servers,
checkpoints that resume after a kill, ZeRO-3, and `ray job submit` against `ray start --head`."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import torch

from pipelines import storage
from tests.integration import servers
from tests.integration.conftest import REPO, job_env, make_cached_root, model_overrides, run_job
from trim.model import LlavaTrim


def _runs(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    return client, [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_overfitting_a_few_samples_drives_the_loss_down_and_is_tracked(tmp_path, tiny_models):
    root = make_cached_root(tmp_path / "overfit", tiny_models, num_samples=8, num_images=4, seed=5)
    with servers.mlflow_server(tmp_path) as uri:
        result = run_job("finetune", *model_overrides(root, tiny_models), "train.micro_batch_size=2",
                         "train.max_steps=80", "train.lr=3e-3", "train.warmup_ratio=0", "train.checkpoint_every=80",
                         env={"MLFLOW_TRACKING_URI": uri})
        client, runs = _runs(uri)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
        assert len(losses) == 80
        # each step a random draw of the 8 samples (LLaVA's order), so the loss moves step to step
        assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5, losses
        for metric in ("lr", "tokens_per_s", "visual_tokens_per_sample"):
            assert client.get_metric_history(run.info.run_id, metric)
        # the tiny recipe's TRIM (the paper's preset: cosine scoring), as logged
        assert run.data.params["train.micro_batch_size"] == "2" and run.data.params["trim.similarity"] == "cosine"
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert {"cache_manifest.json", "recipe.json", "trim_config.json", "model"} <= set(artifacts)
        versions = client.search_model_versions("name = 'trim-llava-tiny'")
        assert [v.run_id for v in versions] == [run.info.run_id]  # the exported model, registered
        assert any(name.startswith("system/") for name in run.data.metrics)  # system metrics on
    assert "look with: mlflow ui" in result.stdout
    model, tokenizer = LlavaTrim.load(root / "checkpoints" / "tiny" / "model")
    assert model.settings["trim"]["iqr_scope"] == "sample" and model.settings["encoder"]["num_patches"] == 576


def test_a_killed_run_resumes_its_step_count_data_position_and_mlflow_run(cached_root, tiny_models):
    overrides = model_overrides(cached_root, tiny_models) + [
        "train.run_name=resume", "train.max_steps=40", "train.checkpoint_every=4", "train.micro_batch_size=2"]
    tracking = f"sqlite:///{cached_root}/mlflow.db"
    args = [sys.executable, str(REPO / "jobs" / "finetune.py"), "--recipe", "tiny"]
    for o in overrides:
        args += ["--set", o]
    env = job_env()
    log = cached_root / "killed-run.log"
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    run_dir = cached_root / "checkpoints" / "resume"
    deadline = time.time() + 300
    while time.time() < deadline and not list(run_dir.glob("checkpoint_*/complete.json")):
        assert process.poll() is None, f"finetune ended before it could be stopped:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    # Killed as soon as the first checkpoint is complete: most often before Ray Train registered it.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
    killed_at = max(json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/complete.json"))
    assert 4 <= killed_at < 40
    assert not (run_dir / "model").exists()

    result = run_job("finetune", *overrides)
    resumed_line = re.search(r"resumed at step (\d+)", result.stdout + result.stderr)
    assert resumed_line, result.stdout[-3000:]
    assert int(resumed_line.group(1)) == killed_at
    final = max((json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/train_state.json")),
                key=lambda s: s["step"])
    assert final["step"] == 40
    # 64 samples, 60 with an image: 30 + 2 micro-batches of 2 (each modality cut on its own), 16 for each
    # of 2 workers an epoch (the plan's count): step 40 is micro-batch 8 of the third epoch (from 0).
    assert final["epoch"] == 2 and final["micro_in_epoch"] == 8
    # Only Ray Train's last two are left: the killed run's checkpoints are removed once spent.
    assert sorted(p.name for p in run_dir.glob("checkpoint_step_*")) == ["checkpoint_step_00000036",
                                                                         "checkpoint_step_00000040"]
    client, runs = _runs(tracking)
    resumed = [r for r in runs if r.info.run_name == "resume"]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(resumed[0].info.run_id, "loss")}
    assert steps == set(range(1, 41))
    assert (run_dir / "model" / "mm_projector.bin").exists()

    # The same run name with another learning rate: refused, naming what differs, nothing trained.
    args = [sys.executable, str(REPO / "jobs" / "finetune.py"), "--recipe", "tiny"]
    for o in overrides + ["train.lr=0.5"]:
        args += ["--set", o]
    refused = subprocess.run(args, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0
    assert "checkpointed with other settings (differ: train.lr)" in refused.stdout + refused.stderr


def test_zero3_trains_and_an_unreachable_mlflow_server_does_not_stop_training(cached_root, tiny_models):
    dead = f"http://127.0.0.1:{servers.free_port()}"
    result = run_job("finetune", *model_overrides(cached_root, tiny_models), "train.run_name=zero3",
                     "train.deepspeed_config=infra/deepspeed/zero3.json", "train.max_steps=3",
                     env={"MLFLOW_TRACKING_URI": dead})
    output = result.stdout + result.stderr
    # Said once, by rank 0 (Ray may forward a worker's line to the driver twice: count distinct lines).
    warnings = {line for line in output.splitlines() if "going on without tracking" in line}
    assert len(warnings) == 1 and dead in warnings.pop()
    assert "over 3 steps" in result.stdout
    model, tokenizer = LlavaTrim.load(cached_root / "checkpoints" / "zero3" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(p.numel() for p in model.llm.parameters()) > 100_000  # gathered from the ZeRO-3 shards


def test_ray_job_submit_runs_the_finetune_job(cached_root, tiny_models, tmp_path):
    env = job_env({"PATH": f"{servers.BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"})
    with servers.ray_head(tmp_path, env) as address:
        command = [str(servers.BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                   "python", "jobs/finetune.py", "--recipe", "tiny"]
        for o in model_overrides(cached_root, tiny_models) + ["train.run_name=submitted", "train.max_steps=2"]:
            command += ["--set", o]
        for _ in range(18):  # a head just started may not have its job agent up yet: Ray says so and asks to retry
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in result.stderr:
                break
            time.sleep(10)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout
        assert "over 2 steps" in result.stdout
    assert (cached_root / "checkpoints" / "submitted" / "model" / "trim_llava.json").exists()


def test_checkpoints_and_model_on_s3_and_a_rerun_resumes_from_there(s3_env, cached_root, tiny_models, tmp_path):
    os.environ.update(s3_env)  # the in-test s3fs client; the jobs get the env explicitly
    try:
        fs, _ = storage.fsspec_fs("s3://trim-train/")
        fs.mkdir("trim-train")
        fs.put(str(cached_root / "cache"), "trim-train/run/cache", recursive=True)
        overrides = ["paths.root=s3://trim-train/run", f"paths.clip={tiny_models.clip}",
                     f"paths.llm={tiny_models.llm}", "train.run_name=s3", "train.max_steps=4",
                     "train.checkpoint_every=2"]
        env = dict(s3_env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
        first = run_job("finetune", *overrides, env=env)
        assert "resumed" not in first.stdout + first.stderr
        run_dir = "s3://trim-train/run/checkpoints/s3"
        names = storage.listdir(run_dir)
        assert [n for n in names if n.startswith("checkpoint_step_")] == ["checkpoint_step_00000002",
                                                                          "checkpoint_step_00000004"]
        assert storage.read_json(f"{run_dir}/checkpoint_step_00000004/complete.json")["step"] == 4
        fs.get("trim-train/run/checkpoints/s3/model", str(tmp_path / "model"), recursive=True)
        model, tokenizer = LlavaTrim.load(tmp_path / "model")
        assert all(torch.isfinite(p).all() for p in model.parameters())

        again = run_job("finetune", *overrides, env=env)
        assert "resumed at step 4" in again.stdout + again.stderr
        client, runs = _runs(env["MLFLOW_TRACKING_URI"])
        assert [r.info.status for r in runs if r.info.run_name == "s3"] == ["FINISHED"]
    finally:
        for key in s3_env:
            os.environ.pop(key, None)


def test_a_lost_worker_is_replaced_and_training_continues_in_the_same_job(cached_root, tiny_models):
    import psutil

    overrides = model_overrides(cached_root, tiny_models) + [
        "train.run_name=heal", "train.max_steps=24", "train.checkpoint_every=4", "train.micro_batch_size=2",
        "train.max_failures=2"]
    tracking = f"sqlite:///{cached_root}/mlflow-heal.db"
    args = [sys.executable, str(REPO / "jobs" / "finetune.py"), "--recipe", "tiny"]
    for o in overrides:
        args += ["--set", o]
    log = cached_root / "heal.log"
    process = subprocess.Popen(args, cwd=REPO, env=job_env({"MLFLOW_TRACKING_URI": tracking}), stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = cached_root / "checkpoints" / "heal"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(run_dir.glob("checkpoint_*/complete.json")):
            assert process.poll() is None, f"finetune ended early:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(process.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline() + [p.name()])]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        killed_after = max(json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/complete.json"))
        workers[1].kill()  # one worker process dies mid-run, as a preempted node would take it
        assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert killed_after < 24
    final = max((json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/train_state.json")),
                key=lambda s: s["step"])
    assert final["step"] == 24 and (run_dir / "model" / "mm_projector.bin").exists()
    client, runs = _runs(tracking)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the restarted workers continued it
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert steps == set(range(1, 25))
