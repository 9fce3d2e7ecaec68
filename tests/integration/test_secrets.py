"""No secret leaves the process that was given it. A sentinel value stands for every credential (AWS
secret key and session token, MLflow password, Hugging Face token) and a random Ray token guards the
head; both are looked for wherever Ray, MLflow and the stages write: the jobs as Ray reports them (job
API, state API: jobs, tasks and actors with their runtime_env), every file of the Ray session (logs
of the runtime-env agent, raylet, GCS, drivers and workers), the MLflow store and its artifacts, and
the manifests on S3. The jobs still reach S3: their workers read the credentials from their own
environment (the raylet's), as a pod does from its Secret.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from synthetic.mixture import write_mixture
from tests.integration import servers
from tests.integration.conftest import REPO, job_env

pytestmark = pytest.mark.integration

SENTINEL = "sntl" + secrets.token_hex(10)
RAY_TOKEN = secrets.token_hex(16)
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY": SENTINEL, "AWS_SESSION_TOKEN": SENTINEL, "MLFLOW_TRACKING_USERNAME": "ci",
              "MLFLOW_TRACKING_PASSWORD": SENTINEL, "HF_TOKEN": SENTINEL}
BUCKET = "trim-secrets"


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [name for name, value in (("sentinel", SENTINEL), ("Ray token", RAY_TOKEN)) if value.encode() in data]


def leaking_files(root: Path) -> list[str]:
    return [f"{p}: {leaks(p.read_bytes())}" for p in sorted(root.rglob("*")) if p.is_file() and leaks(p.read_bytes())]


@contextmanager
def ray_head(env: dict):
    """`ray start --head --block` in a temporary dir of its own (so no other ray.init on this machine
    finds it), on free ports; killed through its process group (never `ray stop`, which would stop
    every Ray on the machine)."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    dashboard = servers.free_port()
    ports = [("port", servers.free_port()), ("dashboard-port", dashboard)] + [
        (name, servers.free_port()) for name in ("node-manager-port", "object-manager-port", "ray-client-server-port",
                                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "runtime-env-agent-port", "metrics-export-port")]
    args = [str(servers.BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(temp), "--node-ip-address",
            "127.0.0.1", "--dashboard-host", "127.0.0.1", "--num-cpus", "4", "--include-dashboard", "true",
            "--disable-usage-stats"] + [f"--{name}={port}" for name, port in ports]
    log = temp / "ray-start.log"
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address, process, log)
        yield address, temp
    finally:
        try:  # the head's processes and its workers share its process group
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(address: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError as err:  # 401: up, and asking for the token
            if err.code == 401:
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{address} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def ray_cli(*args: str, env: dict, timeout: float = 300) -> str:
    """A `ray` command as a user of the cluster runs it (with the Ray token, no other credential)."""
    result = subprocess.run([str(servers.BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"ray {' '.join(args[:3])}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def run_on_head(address: str, job: list[str], env: dict, timeout: float = 300) -> str:
    """`ray job submit` without following the logs (their websocket may drop under load), then
    the job's details from the job API until it ends, and its logs; returns all of it."""
    submitted = ray_cli("job", "submit", "--address", address, "--no-wait", "--working-dir", ".", "--", "python",
                        *job, env=env)
    job_id = re.search(r"raysubmit_\w+", submitted)[0]
    request = urllib.request.Request(f"{address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {RAY_TOKEN}"})
    deadline = time.time() + timeout
    while (details := json.loads(urllib.request.urlopen(request, timeout=30).read()))["status"] not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"{job}: not done after {timeout}s"
        time.sleep(1)
    logs = ray_cli("job", "logs", "--address", address, job_id, env=env)
    assert details["status"] == "SUCCEEDED", logs[-4000:]
    return "\n".join([submitted, json.dumps(details), logs])


def test_jobs_on_a_ray_head_leak_no_secret_and_their_workers_still_reach_s3(s3_env, tiny_models, tmp_path):
    import s3fs

    endpoint = s3_env["AWS_ENDPOINT_URL"]
    fs = s3fs.S3FileSystem(key="AKIDSECRETSTEST", secret=SENTINEL, token=SENTINEL, endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    write_mixture(tmp_path / "data", num_samples=16, num_images=6, seed=3)
    fs.put(str(tmp_path / "data"), f"{BUCKET}/run/data", recursive=True)
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    path = f"{servers.BIN}:{os.environ['PATH']}"
    # What a Ray pod's environment holds: the settings, the credentials (its Secret) and the Ray token.
    head_env = job_env({**SECRET_ENV, "AWS_ACCESS_KEY_ID": "AKIDSECRETSTEST", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_URI": mlflow_uri,
                        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN, "PATH": path})
    # A user, or KubeRay's submitter pod: the Ray token and nothing else.
    user_env = {k: v for k, v in job_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN, "PATH": path}).items()
                if not k.startswith("AWS_") and k not in SECRET_ENV}
    overrides = ["--recipe", "tiny", "--set", f"paths.root=s3://{BUCKET}/run", "--set", f"paths.clip={tiny_models.clip}",
                 "--set", f"paths.llm={tiny_models.llm}"]
    with ray_head(head_env) as (address, temp):
        reported = {
            "shard job": run_on_head(address, ["jobs/shard.py", *overrides, "--set", "shard.concurrency=1"], user_env),
            "precompute job": run_on_head(address, ["jobs/precompute.py", *overrides, "--set", "precompute.batch_size=8",
                                                    "--set", "eval.num_pictures=1"], user_env),
            "job list": ray_cli("job", "list", "--address", address, env=user_env)}
        for kind in ("jobs", "tasks", "actors"):
            reported[kind] = ray_cli("list", kind, "--address", address, "--detail", "--format", "json", "--limit",
                                     "10000", env=user_env)
        # The tasks' runtime_env is where init_ray's env_vars show: the settings are there, no secret.
        assert endpoint in reported["tasks"] and "worker_process_setup_hook" in reported["tasks"]
        assert {name: leaks(text) for name, text in reported.items()} == {name: [] for name in reported}
        assert leaking_files(temp) == []

    assert leaking_files(tmp_path / "mlflow") == []  # the sqlite store (params, tags, metrics) and artifacts
    store = mlflow.MlflowClient(mlflow_uri)
    (run,) = [r for e in store.search_experiments() for r in store.search_runs([e.experiment_id])]
    assert run.info.status == "FINISHED" and run.data.params  # the precompute run, with its params
    written = [p for p in fs.find(f"{BUCKET}/run") if p.endswith(".json") and "/data/" not in p]
    assert len(written) >= 2  # the shard and cache manifests (and whatever else the stages record)
    assert {p: leaks(fs.cat(p)) for p in written} == {p: [] for p in written}


LOCAL_SCRIPT = """
import hashlib, json, os
import ray
from pipelines.ray_cluster import init_ray
init_ray(num_cpus=1)
digest = lambda: hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()
same = ray.get(ray.remote(digest).remote()) == digest() != hashlib.sha256(b"").hexdigest()
print(json.dumps({"same": same, "runtime_env": ray.get_runtime_context().runtime_env}))
ray.shutdown()
"""


def test_a_local_cluster_gives_its_workers_the_drivers_credentials_outside_the_runtime_env():
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # RAY_TMPDIR: a session of its own
    env = job_env({**SECRET_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "RAY_TMPDIR": str(temp),
                   "PYTHONPATH": str(REPO)})
    process = subprocess.Popen([str(servers.BIN / "python"), "-c", LOCAL_SCRIPT], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, out[-2000:] + err[-4000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["same"], "the worker did not inherit the driver's credentials"
        forwarded = result["runtime_env"]["env_vars"]
        assert forwarded["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
        assert not set(forwarded) & {*SECRET_ENV, "AWS_ACCESS_KEY_ID"}
        assert leaks(out + err) == [] and leaking_files(temp) == []
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the local cluster is left
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)
