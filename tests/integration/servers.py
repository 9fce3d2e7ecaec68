"""Real servers for integration tests, started on 127.0.0.1 and stopped by the fixture that started
them: moto's S3 endpoint, an MLflow tracking server (sqlite), a Ray head for job submission."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout}s; log:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def moto_s3(workdir: Path):
    """A moto S3 endpoint; yields the environment a client needs (dummy keys, endpoint URL)."""
    port = free_port()
    log = workdir / "moto.log"
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", process, 30, log)
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        stop(process)


@contextmanager
def mlflow_server(workdir: Path):
    """A lean MLflow tracking server with a sqlite backend; yields its URI."""
    port = free_port()
    log = workdir / "mlflow.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db", "--artifacts-destination", str(workdir / "artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, 90, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@contextmanager
def ray_head(workdir: Path, env: dict | None = None):
    """`ray start --head` on loopback; yields the dashboard address for `ray job submit`."""
    dashboard = free_port()
    env = dict(env or os.environ, RAY_AUTH_MODE="token")
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4",
         "--include-dashboard", "true", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, text=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
