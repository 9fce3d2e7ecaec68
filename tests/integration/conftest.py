"""Integration fixtures: a tiny run (models, synthetic mixture with faulty records) and real servers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import servers

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def job_env(extra: dict | None = None) -> dict:
    """The environment of a job the tests start: this one, minus what an in-process job may have left
    behind (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a Ray address), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return dict(env, TRIM_PROGRESS="0", **(extra or {}))


def run_job(job: str, *overrides: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run jobs/<job>.py as a user would, in its own process (its own local Ray)."""
    args = [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--recipe", "tiny"]
    for override in overrides:
        args += ["--set", override]
    result = subprocess.run(args, cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{job} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_models):
    """A run root with a synthetic mixture that includes one bad record of each kind."""
    from synthetic.mixture import write_eval_split, write_mixture

    root = tmp_path_factory.mktemp("run")
    write_mixture(root / "data", num_samples=120, num_images=40, seed=0, faults=True)
    write_eval_split(root / "data" / "eval", num_questions=8)
    return root


@pytest.fixture(scope="session")
def tiny_overrides(tiny_data, tiny_models):
    return [f"paths.root={tiny_data}", f"paths.clip={tiny_models.clip}", f"paths.llm={tiny_models.llm}"]


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    with servers.moto_s3(tmp_path_factory.mktemp("moto")) as env:
        yield env


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipelines.ray_cluster import init_ray

    os.environ["TRIM_PROGRESS"] = "0"
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def make_cached_root(root, tiny_models, num_samples, num_images, seed=0):
    """A run root with shards and a TRIM cache, made by the shard and precompute jobs."""
    from synthetic.mixture import write_eval_split, write_mixture

    write_mixture(root / "data", num_samples=num_samples, num_images=num_images, seed=seed)
    write_eval_split(root / "data" / "eval", num_questions=8)
    overrides = model_overrides(root, tiny_models)
    run_job("shard", *overrides, "shard.concurrency=1")
    run_job("precompute", *overrides, "precompute.batch_size=8")
    return root


@pytest.fixture(scope="session")
def cached_root(tmp_path_factory, tiny_models):
    """64 samples, sharded and cached: the input of fine-tuning tests."""
    return make_cached_root(tmp_path_factory.mktemp("cached"), tiny_models, num_samples=64, num_images=24)


def model_overrides(root, tiny_models):
    return [f"paths.root={root}", f"paths.clip={tiny_models.clip}", f"paths.llm={tiny_models.llm}"]
