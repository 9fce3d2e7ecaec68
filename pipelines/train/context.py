"""What a fine-tuning worker takes from its surroundings: its rank among the workers, the checkpoint it
was (re)started from, a place to hand each checkpoint to, and the tracker its metrics go to.

Under Ray Train these are Ray Train's (`RayTrainContext`, the default of `worker.train_loop`).
`LocalContext` provides them in one process without Ray, for the worker's own code to run where Ray is
absent (benchmarks/gpu_check.py's engine section on a GPU node): checkpoints are put under the run
directory as Ray Train puts them, and the tracker records metrics in memory instead of MLflow.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipelines import storage
from pipelines.tracking import Tracker
from pipelines.train.plan import TrainJob


class WorkerContext(Protocol):
    """The surroundings of one worker (one rank)."""

    def world_rank(self) -> int: ...

    def world_size(self) -> int: ...

    def local_rank(self) -> int: ...

    def registered_checkpoint(self) -> Any:
        """The checkpoint the platform registered for this run (a handle with `.path` and
        `.filesystem`, a pyarrow filesystem), or None."""
        ...

    def checkpoint_at(self, path: str, filesystem: Any) -> Any:
        """A handle of the checkpoint folder at `path` on `filesystem`."""
        ...

    def report(self, metrics: dict, directory: str, name: str) -> None:
        """Hand over this rank's checkpoint files in `directory` as checkpoint `name` of the run; returns
        once they are stored."""
        ...

    def tracker(self, job: TrainJob, is_master: bool) -> Tracker:
        """The tracker this rank's run logs to (a context manager)."""
        ...


class RayTrainContext:
    """Ray Train's worker context, checkpoint registry and report; MLflow tracking on rank 0."""

    def __init__(self) -> None:
        import ray.train

        self._context = ray.train.get_context()

    def world_rank(self) -> int:
        return int(self._context.get_world_rank())

    def world_size(self) -> int:
        return int(self._context.get_world_size())

    def local_rank(self) -> int:
        return int(self._context.get_local_rank())

    def registered_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def checkpoint_at(self, path: str, filesystem: Any) -> Any:
        import ray.train

        return ray.train.Checkpoint(path, filesystem=filesystem)

    def report(self, metrics: dict, directory: str, name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)

    def tracker(self, job: TrainJob, is_master: bool) -> Tracker:
        return Tracker(job.tracking_uri, job.experiment, enabled=is_master)


@dataclass
class LocalCheckpoint:
    """A checkpoint folder as Ray Train's Checkpoint names it: a path on a pyarrow filesystem."""

    path: str
    filesystem: Any


class RecordingTracker(Tracker):
    """A tracker that sends nothing and keeps every step's metrics (`steps`) in memory."""

    def __init__(self, job: TrainJob) -> None:
        super().__init__(job.tracking_uri, job.experiment, enabled=False)
        self.steps: list[tuple[int, dict[str, float]]] = []

    def log_metric_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        self.steps += [(step, dict(metrics)) for step, metrics in steps]


@dataclass
class LocalContext:
    """The worker's surroundings in a process of its own (rank and world from the process group it
    joined; world size 1 unless given): no checkpoint is registered (a restart resumes from the newest
    complete one on storage, as after a lost worker under Ray Train), a reported checkpoint is moved to
    `run_dir/name`, metrics are recorded (`reports`, and the tracker's `steps`)."""

    run_dir: str
    """The run's checkpoint folder (TrainJob.run_dir)."""
    rank: int = 0
    world: int = 1
    local: int = 0
    reports: list[tuple[str, dict]] = field(default_factory=list)
    """(checkpoint name, metrics) of every report, in order."""
    trackers: list[RecordingTracker] = field(default_factory=list)
    """The trackers handed out, in order."""

    def world_rank(self) -> int:
        return self.rank

    def world_size(self) -> int:
        return self.world

    def local_rank(self) -> int:
        return self.local

    def registered_checkpoint(self) -> Any:
        return None

    def checkpoint_at(self, path: str, filesystem: Any) -> Any:
        return LocalCheckpoint(path, filesystem)

    def report(self, metrics: dict, directory: str, name: str) -> None:
        target = storage.join(self.run_dir, name)
        for root, _, files in os.walk(directory):
            for file in files:
                source = os.path.join(root, file)
                relative = os.path.relpath(source, directory).replace(os.sep, "/")
                if storage.is_s3(target):
                    fs, path = storage.fsspec_fs(storage.join(target, relative))
                    fs.put_file(source, path)
                else:  # a move within the disk: a 7B checkpoint is not copied
                    os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
                    shutil.move(source, os.path.join(target, relative))
        self.reports.append((name, dict(metrics)))

    def tracker(self, job: TrainJob, is_master: bool) -> Tracker:
        self.trackers.append(RecordingTracker(job))
        return self.trackers[-1]
