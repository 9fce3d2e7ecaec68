"""Fault drills on a multi-node Ray cluster on this machine: a head (no CPUs: the drivers' node) and two
worker nodes, each its own `ray start`. A worker node is killed whole (every process of it, SIGKILL)
while shard, precompute or fine-tune runs on the cluster; the same job, or a rerun where it fails,
must finish with every sample exactly once, and training must continue from the newest complete
checkpoint in one MLflow run. Each drill logs what it killed, when, and what it found after.

Slow (minutes each) and heavy: excluded from the default run, run with `make drills`.
"""

import json
import logging
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.cache_format import iter_cache
from pipelines.manifests import IDENTITY_FILE, MANIFEST_FILE, ShardsManifest, resolve_output
from synthetic.mixture import write_mixture
from tests.integration import servers
from tests.integration.conftest import REPO, job_env, model_overrides

pytestmark = pytest.mark.drill
logger = logging.getLogger(__name__)

JOB_TIMEOUT_S = 1800  # a loaded 2-core machine runs three Ray nodes beside other work
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with servers.mlflow_server(tmp_path_factory.mktemp("drill-mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with servers.ray_cluster(tmp_path_factory.mktemp("drill-ray"), job_env(), workers=2, worker_cpus=4) as c:
        yield c


@pytest.fixture
def full_cluster(cluster):
    """The cluster with two live worker nodes again (a drill before may have killed one)."""
    while len(cluster.workers) < 2:
        cluster.add_worker()
    return cluster


def _start(job: str, overrides: list[str], env: dict, log: Path) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--recipe", "tiny"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run(job: str, overrides: list[str], env: dict, log: Path) -> str:
    """Run a job on the cluster to its end; returns its output (fails the test if the job fails)."""
    process = _start(job, overrides, env, log)
    assert process.wait(timeout=JOB_TIMEOUT_S) == 0, f"{job} failed:\n{log.read_text()[-6000:]}"
    return log.read_text()


def _wait_for(what: str, found, process: subprocess.Popen, log: Path, timeout: float = JOB_TIMEOUT_S,
              every: float = 0.1):
    """Poll found() until it returns something true; fail if the job ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = found()
        if value:
            return value
        assert process.poll() is None, f"the job ended before {what}:\n{log.read_text()[-4000:]}"
        time.sleep(every)
    raise AssertionError(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _kill_node_running(cluster: servers.RayCluster, marker: str, process, log) -> dict:
    """Kill the worker node on which a process runs `marker` (a task or actor name); returns what ran
    there (Ray workers only) and which node it was."""
    node = _wait_for(f"a worker node running {marker}", lambda: next(iter(cluster.running(marker)), None), process,
                     log, timeout=120, every=0.3)
    titles = cluster.kill_worker(node)
    busy = Counter(t.strip() for t in titles if t.startswith("ray::") and not t.startswith(AGENTS))
    return {"node": node.name, "processes": len(titles), "ray_workers": dict(sorted(busy.items())),
            "at": time.strftime("%H:%M:%S")}


def _finish_or_rerun(job: str, overrides: list[str], env: dict, process, log: Path) -> dict:
    """Wait for the job that lost a node; rerun it where it failed. Returns how it ended."""
    code = process.wait(timeout=JOB_TIMEOUT_S)
    output = log.read_text()
    outcome: dict = {"same_job_exit": code, "rerun": code != 0,
                     "ray_retry_messages": output.count("will be retried"),
                     "train_failure_decisions": sorted(set(re.findall(r"\[FailurePolicy\] (\w+)", output)))}
    if code != 0:
        logger.info("%s failed after the kill (exit %d): %s", job, code, _last_error(output))
        rerun_log = log.with_name(log.stem + "-rerun.log")
        outcome["rerun_output"] = _run(job, overrides, env, rerun_log)
    return outcome


def _last_error(output: str) -> str:
    lines = [line for line in output.splitlines() if "Error" in line or "failed" in line]
    return lines[-1][:300] if lines else output[-300:]


def _record(drill: str, record: dict) -> None:
    shown = {k: v for k, v in record.items() if k != "rerun_output"}
    logger.info("drill %s: %s", drill, json.dumps(shown, sort_keys=True))


def _unlisted(folder: str, files: dict) -> list[str]:
    """Files in a version folder that its manifest does not list (no reader opens them)."""
    return sorted(set(storage.listdir(folder)) - set(files) - {MANIFEST_FILE, IDENTITY_FILE})


def _mixture(root: Path, num_samples: int, num_images: int, seed: int) -> list[dict]:
    path = write_mixture(root / "data", num_samples=num_samples, num_images=num_images, seed=seed)
    return json.loads(path.read_text())


def _assert_samples_match_mixture(rows: list[dict], records: list[dict]) -> dict:
    """Every record of the mixture exactly once, at its position, with its id."""
    indices = [r["index"] for r in rows]
    duplicates = len(indices) - len(set(indices))
    assert duplicates == 0, f"{duplicates} duplicate sample(s)"
    assert sorted(indices) == list(range(len(records))), "samples missing or foreign"
    wrong = [r["index"] for r in rows if r["id"] != str(records[r["index"]]["id"])]
    assert not wrong, f"ids that differ from the mixture at positions {wrong[:10]}"
    return {"rows": len(rows), "distinct_indices": len(set(indices)), "duplicates": duplicates,
            "mixture_records": len(records)}


def test_a_worker_node_killed_mid_shard(full_cluster, tracking, tmp_path):
    root = tmp_path / "run"
    records = _mixture(root, num_samples=800, num_images=60, seed=11)
    overrides = [f"paths.root={root}", "shard.rows_per_shard=16", "shard.images_per_shard=8", "shard.concurrency=2"]
    env = job_env({**full_cluster.client_env(), "MLFLOW_TRACKING_URI": tracking})
    log = tmp_path / "shard.log"
    process = _start("shard", overrides, env, log)
    shards = root / "shards"
    _wait_for("a samples file", lambda: list(shards.glob("v-*/samples-*.parquet")), process, log)
    killed = _kill_node_running(full_cluster, "write_chunk_batch", process, log)
    (version,) = shards.glob("v-*")
    written = sorted(p.name for p in version.glob("samples-*.parquet"))
    killed.update(samples_files_written=len(written), rows_written=sum(pq.read_metadata(version / n).num_rows
                                                                       for n in written),
                  manifest_written=(version / MANIFEST_FILE).exists())
    assert not killed["manifest_written"] and len(written) < -(-len(records) // 16), "killed after the stage ended"
    outcome = _finish_or_rerun("shard", overrides, env, process, log)

    folder = resolve_output(str(shards))
    manifest = ShardsManifest.read(folder)
    rows = [r for name in sorted(manifest.files) if name.startswith("samples-")
            for r in storage.read_parquet(f"{folder}/{name}", columns=["index", "id", "image_key"]).to_pylist()]
    found = _assert_samples_match_mixture(rows, records)
    images = [r["image_key"] for name in sorted(manifest.files) if name.startswith("images-")
              for r in storage.read_parquet(f"{folder}/{name}", columns=["image_key"]).to_pylist()]
    assert len(images) == len(set(images)) == manifest.images  # each distinct image stored once
    assert {r["image_key"] for r in rows if r["image_key"]} == set(images)
    assert manifest.samples == len(rows) and manifest.rejects == 0
    found.update(images=len(images), version=manifest.version, unlisted_files=_unlisted(folder, manifest.files))
    _record("shard", {"killed": killed, **outcome, "found": found})


def test_a_worker_node_killed_mid_precompute(full_cluster, tracking, tiny_models, tmp_path):
    root = tmp_path / "run"
    records = _mixture(root, num_samples=160, num_images=48, seed=12)
    overrides = model_overrides(root, tiny_models) + ["precompute.batch_size=2", "precompute.rows_per_file=8"]
    env = job_env({**full_cluster.client_env(), "MLFLOW_TRACKING_URI": tracking})
    _run("shard", overrides, env, tmp_path / "shard.log")
    log = tmp_path / "precompute.log"
    process = _start("precompute", overrides, env, log)
    cache = root / "cache"
    _wait_for("a cache part", lambda: list(cache.glob("v-*/part-*.parquet")), process, log)
    killed = _kill_node_running(full_cluster, "EncoderActor", process, log)
    (version,) = cache.glob("v-*")
    parts = sorted(p.name for p in version.glob("part-*.parquet"))
    killed.update(parts_written=len(parts), rows_written=sum(pq.read_metadata(version / n).num_rows for n in parts),
                  manifest_written=(version / MANIFEST_FILE).exists())
    assert not killed["manifest_written"] and killed["rows_written"] < len(records), "killed after the stage ended"
    outcome = _finish_or_rerun("precompute", overrides, env, process, log)
    if outcome["rerun"]:
        skipped = re.search(r"(\d+) already written", outcome["rerun_output"])
        outcome["parts_skipped_by_rerun"] = int(skipped.group(1)) if skipped else 0

    rows = list(iter_cache(str(cache), ["index", "id"]))
    found = _assert_samples_match_mixture(rows, records)
    folder = resolve_output(str(cache))
    manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    assert manifest["samples"] == len(rows)
    found.update(parts=len(manifest["files"]), version=manifest["version"],
                 unlisted_files=_unlisted(folder, manifest["files"]))
    _record("precompute", {"killed": killed, **outcome, "found": found})


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/complete.json"))


def _runs(client: mlflow.MlflowClient, name: str) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == name]


def test_a_worker_node_killed_mid_finetune(full_cluster, tracking, tiny_models, tmp_path):
    root, max_steps = tmp_path / "run", 24
    _mixture(root, num_samples=64, num_images=24, seed=13)
    env = job_env({**full_cluster.client_env(), "MLFLOW_TRACKING_URI": tracking})
    for stage in ("shard", "precompute"):  # on the cluster: no second Ray on this machine
        _run(stage, model_overrides(root, tiny_models), env, tmp_path / f"{stage}.log")
    overrides = model_overrides(root, tiny_models) + [
        "train.run_name=drill", f"train.max_steps={max_steps}", "train.checkpoint_every=4",
        "train.micro_batch_size=2", "train.max_failures=3"]
    log = tmp_path / "finetune.log"
    run_dir = root / "checkpoints" / "drill"
    process = _start("finetune", overrides, env, log)
    _wait_for("a complete checkpoint", lambda: _complete_steps(run_dir), process, log)
    killed = _kill_node_running(full_cluster, "RayTrainWorker", process, log)
    client = mlflow.MlflowClient(tracking)
    killed.update(complete_checkpoints=_complete_steps(run_dir), model_written=(run_dir / "model").exists(),
                  steps_logged=max((m.step for r in _runs(client, "drill")
                                    for m in client.get_metric_history(r.info.run_id, "loss")), default=0))
    newest = killed["complete_checkpoints"][-1]
    assert newest < max_steps and not killed["model_written"], "killed after training ended"
    outcome = _finish_or_rerun("finetune", overrides, env, process, log)

    output = log.read_text() + outcome.get("rerun_output", "")
    # distinct lines: Ray may forward a worker's line to the driver twice
    resumed = sorted({(int(s), r) for s, r in re.findall(r"resumed at step (\d+) .*?MLflow run (\w+)", output)})
    assert resumed, "no resume: training started again from step 0"
    steps = {s for s, _ in resumed}
    assert steps == {newest}, f"resumed at {sorted(steps)}, the newest complete checkpoint was {newest}"
    final = max((json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/train_state.json")),
                key=lambda s: s["step"])
    assert final["step"] == max_steps and (run_dir / "model" / "mm_projector.bin").exists()
    runs = _runs(client, "drill")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    run_id = runs[0].info.run_id
    assert {r for _, r in resumed} == {run_id}
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert logged == set(range(1, max_steps + 1))
    found = {"resumed_at": sorted(steps), "resumes": len(resumed), "final_step": final["step"],
             "mlflow_runs": [r.info.run_id for r in runs], "loss_steps_logged": len(logged)}
    _record("finetune", {"killed": killed, **outcome, "found": found})
