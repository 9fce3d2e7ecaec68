"""Training checkpoints: save, mark complete, find, restore and clean, names formatted and parsed here.

A checkpoint is a folder `checkpoint_step_NNNNNNNN` under the run directory (local or s3://) holding
every rank's DeepSpeed shards (tag ENGINE_TAG) and the training state (STATE_FILE). It counts as
complete once every rank has uploaded its part: rank 0 then writes COMPLETE_FILE into it. Ray Train
registers a checkpoint a moment after the upload, so a job killed in between leaves a complete
checkpoint that Ray does not know; `find_resume_point` finds it and the run resumes there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.train_plan import TrainState

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
"""The TrainState inside a checkpoint (written by rank 0)."""
COMPLETE_FILE = "complete.json"
"""Written by rank 0 once every rank's upload is done; only complete checkpoints are resumed from."""
ENGINE_TAG = "engine"
"""DeepSpeed's tag (its sub-folder) for the engine shards."""
PREFIX = "checkpoint_step_"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Where Ray Train lists the checkpoints it registered in a run directory."""


def dir_name(step: int) -> str:
    """The folder name of the checkpoint at `step` (names sort by step)."""
    return f"{PREFIX}{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name, None if the name is not one."""
    tail = name[len(PREFIX):]
    return int(tail) if name.startswith(PREFIX) and tail.isdigit() else None


# Worker side ------------------------------------------------------------------------------------


def save(engine: Any, state: TrainState, metrics: dict, run_dir: str, is_master: bool) -> None:
    """Every rank writes its DeepSpeed shards; Ray Train gathers them into one checkpoint folder.
    Once all ranks have uploaded (the barrier), rank 0 marks it complete."""
    import ray.train
    import torch.distributed as dist

    name = dir_name(state.step)
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=ENGINE_TAG)
        if is_master:
            Path(directory, STATE_FILE).write_text(state.to_json())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name)
    dist.barrier()  # report() returns once this rank's upload is done, not every rank's
    if is_master:
        storage.write_json(storage.join(run_dir, name, COMPLETE_FILE), state.to_dict())


def load(engine: Any, directory: str, source: str) -> TrainState:
    """Load a local checkpoint folder into the engine; returns its training state. A checkpoint that
    cannot be read is named, with what to do about it."""
    try:
        engine.load_checkpoint(directory, tag=ENGINE_TAG)
        return TrainState.from_json(Path(directory, STATE_FILE).read_text())
    except Exception as error:
        raise RuntimeError(f"finetune: cannot resume from checkpoint {source}: {error!r}. Delete that folder "
                           "to resume from the one before it, or choose another train.run_name.") from error


def _state_of(checkpoint: Any) -> TrainState:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return TrainState.from_json(f.read().decode())


def restore(engine: Any, registered: Any, found: str | None) -> TrainState:
    """Load the newer of Ray Train's registered checkpoint and the newest complete one the driver
    found on storage; returns the training state (a fresh one when there is neither)."""
    import pyarrow.fs
    import ray.train

    checkpoint = registered
    if found:
        found_step = storage.read_json(storage.join(found, COMPLETE_FILE))["step"]
        if registered is None or _state_of(registered).step < found_step:
            fs, path = storage.arrow_fs(found)
            checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is None:
        return TrainState()
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return load(engine, checkpoint.path, checkpoint.path)
    return _restore_remote(engine, checkpoint)


RANK_FILE = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_")
"""DeepSpeed's per-rank shard files (optimizer and, under ZeRO-3, parameter partitions)."""


def files_for_ranks(names: list[str], ranks: set[int]) -> list[str]:
    """The checkpoint files a node whose workers hold `ranks` must read: every shared file (state,
    `latest`, the model states of ZeRO-1/2) and the per-rank shards of those ranks only."""
    wanted = []
    for name in names:
        match = RANK_FILE.search(name)
        if match is None or int(match.group(1)) in ranks:
            wanted.append(name)
    return wanted


def _ranks_on_this_node() -> set[int]:
    import socket

    import torch.distributed as dist

    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    here = socket.gethostname()
    return {rank for rank, host in enumerate(hosts) if host == here}


def _download(checkpoint: Any, directory: str, ranks: set[int]) -> None:
    """Copy the files of `checkpoint` this node needs into directory (not the other nodes' shards:
    at 7B under ZeRO-3 a whole checkpoint is ~100 GB, a node's share an eighth of it per 8 ranks)."""
    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    names = [info.path[len(root) + 1:] for info in infos if info.type == pafs.FileType.File]
    for name in files_for_ranks(names, ranks):
        target = os.path.join(directory, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(f"{root}/{name}", target, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())


def _restore_remote(engine: Any, checkpoint: Any) -> TrainState:
    """One download per node, by its local rank 0, of the files its ranks read; read by every rank
    there, removed once all have loaded (Ray's shared as_directory() lets one rank delete it before
    another has read it)."""
    import ray.train
    import torch.distributed as dist

    name = "trim-restore-" + hashlib.sha1(checkpoint.path.encode()).hexdigest()
    directory = os.path.join(tempfile.gettempdir(), name)
    first_on_node = ray.train.get_context().get_local_rank() == 0
    ranks = _ranks_on_this_node()  # collective: every rank takes part
    if first_on_node:
        shutil.rmtree(directory, ignore_errors=True)
        _download(checkpoint, directory, ranks)
    dist.barrier()
    try:
        return load(engine, directory, checkpoint.path)
    finally:
        dist.barrier()
        if first_on_node:
            shutil.rmtree(directory, ignore_errors=True)


# Driver side ------------------------------------------------------------------------------------


def newest_complete(run_dir: str) -> str | None:
    """The newest complete checkpoint under run_dir (registered with Ray Train or not), or None.
    Workers call it when they start, also when Ray Train restarts them after a lost worker."""
    names = [n for n in storage.listdir(run_dir) if step_of(n) is not None]
    complete = [n for n in names if storage.exists(storage.join(run_dir, n, COMPLETE_FILE))]
    return storage.join(run_dir, max(complete)) if complete else None  # the names sort by step


def find_resume_point(run_dir: str) -> str | None:
    """The driver's view before a job: the newest complete checkpoint (see newest_complete), or None.
    Unregistered checkpoints older than it are removed (`remove_unregistered_before`)."""
    newest = newest_complete(run_dir)
    if newest is not None:
        remove_unregistered_before(run_dir, posixpath.basename(newest.rstrip("/")))
    return newest


def remove_unregistered_before(run_dir: str, newest: str) -> None:
    """Delete the checkpoints older than `newest` that Ray Train never registered (the job was killed
    first, or one was resumed from): nothing would ever use or clean them up otherwise."""
    snapshot = storage.join(run_dir, RAY_SNAPSHOT_FILE)
    try:
        registered = ({r["checkpoint_dir_name"] for r in storage.read_json(snapshot)["checkpoint_results"]}
                      if storage.exists(snapshot) else set())
    except (KeyError, TypeError, ValueError) as error:
        logger.warning("cannot read %s (%r); keeping every checkpoint", snapshot, error)
        return
    for name in storage.listdir(run_dir):
        if step_of(name) is not None and name < newest and name not in registered:
            logger.info("removing %s, a checkpoint Ray Train never registered, older than %s", name, newest)
            storage.remove(storage.join(run_dir, name))
