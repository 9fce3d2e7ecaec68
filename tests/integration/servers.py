"""Real servers for integration tests, started on 127.0.0.1 and stopped by the fixture that started
them: moto's S3 endpoint, an MLflow tracking server (sqlite), a Ray head for job submission, and a
multi-node Ray cluster on this machine (head and worker nodes, each its own `ray start`) for fault drills."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
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


class RayNode:
    """One node of a RayCluster: a `ray start --block` process in its own session, with its own temp
    dir. Its processes are the ones that descend from that process or name its temp dir (a daemon
    whose parent died is still found), with their descendants (the raylet's worker processes)."""

    def __init__(self, name: str, process: subprocess.Popen, log: Path, temp_dir: Path):
        self.name, self.process, self.log, self.temp_dir = name, process, log, temp_dir

    def processes(self) -> list:
        import psutil

        mine = re.compile(re.escape(str(self.temp_dir)) + r"(/|\s|$)")
        roots = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == self.process.pid or mine.search(" ".join(p.info["cmdline"] or [])):
                roots.append(p)
        found = {}
        for root in roots:
            try:
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def titles(self, processes: list | None = None) -> list[str]:
        """The command lines of the node's processes (a Ray worker's shows what it runs: `ray::...`)."""
        import psutil

        titles = []
        for p in self.processes() if processes is None else processes:
            try:
                titles.append(" ".join(p.cmdline()) or p.name())
            except psutil.Error:
                continue
        return titles

    def kill(self) -> list[str]:
        """SIGKILL every process of the node at once, as a machine that is lost; returns what ran."""
        victims = self.processes()
        titles = self.titles(victims)
        self._kill(victims)
        return titles

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its node), then SIGKILL to whatever is left."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self._kill(self.processes())

    def _kill(self, victims: list) -> None:
        import psutil

        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


PATIENT_RAY_START = """
import sys, time, types
import ray._private.node as node
clock = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if not n.startswith("_")})
clock.monotonic = lambda: time.monotonic() / 8
node.time = clock
from ray.scripts.scripts import main
sys.exit(main())
"""
"""`ray start`, patient: it gives a new raylet 30 s to register with the GCS (a constant in
ray._private.node), and on a loaded machine the node's agents alone can take longer to start. That
module's clock runs 8 times slower here, so it waits 4 minutes (its other waits, such as the drain on
SIGTERM, stretch alike); nothing else changes."""


class RayCluster:
    """A head and worker nodes on loopback, each a separate `ray start` with its own ports and temp dir:
    a multi-node cluster on one machine. Only this cluster's processes are ever signalled (by pid): no
    `ray stop`, which would stop every Ray on the machine."""

    START_ATTEMPTS = 3
    """A node that still fails to start (a port taken meanwhile, a raylet that aborted under load) is
    started again, on new ports."""

    def __init__(self, workdir: Path, env: dict, worker_cpus: int):
        import secrets
        import tempfile

        # Token authentication, as the manifests run it; this cluster's own token, not ~/.ray's.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {**{k: v for k, v in env.items() if k != "RAY_ADDRESS"}, **self.auth}
        self.workdir, self.worker_cpus = workdir, worker_cpus
        # Unix socket paths must stay under ~107 bytes: a short temp root, not pytest's deep tmp_path.
        self.temp_root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
        self.address = ""
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []
        self._started = 0

    def _start(self, name: str, args: list[str] | Callable[[], list[str]]) -> RayNode:
        for attempt in range(1, self.START_ATTEMPTS + 1):
            node = self._try_start(f"{name}-{attempt}", args() if callable(args) else args)
            if node is not None:
                return node
        raise RuntimeError(f"ray node {name} did not start in {self.START_ATTEMPTS} attempts; see {self.workdir}")

    def _try_start(self, name: str, args: list[str], timeout: float = 300) -> RayNode | None:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        temp_dir = self.temp_root / name
        command = [sys.executable, "-c", PATIENT_RAY_START, "start", "--block", "--node-ip-address", "127.0.0.1",
                   "--disable-usage-stats", "--temp-dir", str(temp_dir), *args]
        for flag in ports:
            command += [flag, str(free_port())]
        log = self.workdir / f"ray-{name}.log"
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env,
                                   start_new_session=True)
        node = RayNode(name, process, log, temp_dir)
        deadline = time.time() + timeout
        while "Ray runtime started" not in log.read_text():
            if process.poll() is not None or time.time() > deadline:
                node.stop()
                with log.open("a") as out:  # the node's logs go with its temp dir: keep their errors
                    for part in sorted(temp_dir.glob("session_2*/logs/*.err")):
                        errors = [line for line in part.read_text().splitlines() if re.search(r" [CEF] |Error", line)]
                        out.write(f"\n== {part.name}\n" + "\n".join(errors[-10:]))
                return None
            time.sleep(0.5)
        return node

    def start_head(self) -> None:
        """The head: GCS and the drivers' node, no CPUs, so that all tasks and actors run on workers."""

        def args() -> list[str]:  # a new GCS port each attempt
            self.address = f"127.0.0.1:{free_port()}"
            # No autoscaler monitor (a fixed cluster): one process less to start on a loaded machine.
            # The API server and the client server always start: on free ports, not 8265 and 10001.
            return ["--head", "--port", self.address.split(":")[1], "--num-cpus", "0", "--include-dashboard", "false",
                    "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                    "--no-monitor"]

        self.head = self._start("head", args)

    def add_worker(self) -> RayNode:
        self._started += 1
        node = self._start(f"w{self._started:02d}", ["--address", self.address, "--num-cpus", str(self.worker_cpus)])
        self.workers.append(node)
        return node

    def client_env(self) -> dict[str, str]:
        """What a driver needs to join: the address and the token."""
        return {"RAY_ADDRESS": self.address, **self.auth}

    def running(self, marker: str) -> list[RayNode]:
        """The live worker nodes with a process whose command line holds `marker` (`EncoderActor`)."""
        return [n for n in self.workers if n.process.poll() is None and any(marker in t for t in n.titles())]

    def kill_worker(self, node: RayNode) -> list[str]:
        self.workers.remove(node)
        return node.kill()

    def stop(self) -> None:
        import shutil

        for node in [*self.workers, *([self.head] if self.head else [])]:
            node.stop()
        shutil.rmtree(self.temp_root, ignore_errors=True)


@contextmanager
def ray_cluster(workdir: Path, env: dict, workers: int = 2, worker_cpus: int = 4):
    """A head (no CPUs) and `workers` worker nodes, each its own `ray start` on 127.0.0.1; yields the
    RayCluster (a driver joins with cluster.client_env()). Stops only its own nodes."""
    cluster = RayCluster(workdir, env, worker_cpus)
    try:
        cluster.start_head()
        for _ in range(workers):
            cluster.add_worker()
        yield cluster
    finally:
        cluster.stop()
