"""Training checkpoints: save, mark complete, find, restore and clean, names formatted and parsed here.

A checkpoint is a folder `checkpoint_step_NNNNNNNN` under the run directory (local or s3://) holding
every rank's DeepSpeed shards (tag ENGINE_TAG) and the training state (STATE_FILE). It counts as
complete once every rank has uploaded its part: rank 0 then writes DIGESTS_FILE (the SHA-256 of
every file each rank wrote) and COMPLETE_FILE into it. Ray Train registers a checkpoint a moment after
the upload, so a job killed in between leaves a complete checkpoint that Ray does not know;
`find_resume_point` finds it and the run resumes there.

DeepSpeed loads its files with full unpickling (torch.load, weights_only=False): a file planted in the
checkpoint folder would run code on the workers. So before loading, every file a rank reads is checked
against DIGESTS_FILE, and a file that is not listed, is missing or differs refuses the checkpoint,
naming the file. The digests file sits beside the files it covers, so it guards against replaced,
added or damaged files, not against someone who can rewrite it too: only the training job may write
the checkpoint storage (docs/runbook.md, "Checkpoints you can trust").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import storage
from pipelines.train.checkpoint_digests import DIGESTS_FILE, digest_file, digest_tree, merge, walk
from pipelines.train.plan import TrainState

if TYPE_CHECKING:
    from pipelines.train.context import WorkerContext

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


def save(engine: Any, state: TrainState, metrics: dict, run_dir: str, is_master: bool,
         context: WorkerContext) -> None:
    """Every rank writes its DeepSpeed shards; the context (Ray Train) gathers them into one
    checkpoint folder. Once all ranks have uploaded, rank 0 records the digests of every rank's files,
    then marks the checkpoint complete."""
    import torch.distributed as dist

    name = dir_name(state.step)
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=ENGINE_TAG)
        if is_master:
            Path(directory, STATE_FILE).write_text(state.to_json())
        mine = digest_tree(directory)
        context.report(metrics, directory, name)
    # report() returns once this rank's upload is done: the gather also waits for every rank's.
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if is_master:
        folder = storage.join(run_dir, name)
        storage.write_json(storage.join(folder, DIGESTS_FILE), {"algorithm": "sha256", "files": merge(everyone)})
        storage.write_json(storage.join(folder, COMPLETE_FILE), state.to_dict())


class UntrustedCheckpoint(RuntimeError):
    """A checkpoint whose files do not match the digests recorded when it was saved."""


def untrusted(directory: str | Path, ranks: set[int] | None = None) -> str | None:
    """Why the checkpoint in directory must not be loaded, naming the file, or None. Every file there
    must be listed in DIGESTS_FILE; the listed files these ranks read (files_for_ranks; None: all)
    must be there with their recorded digest."""
    try:
        listed = json.loads(Path(directory, DIGESTS_FILE).read_text())["files"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
            raise TypeError("names and digests must be strings")
    except FileNotFoundError:
        return f"it has no {DIGESTS_FILE} (it is not complete, or was written before digests were recorded)"
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its {DIGESTS_FILE} cannot be read ({error!r})"
    files, others = walk(directory)
    present = set(files) - {DIGESTS_FILE, COMPLETE_FILE}
    unlisted = others + sorted(present - set(listed))
    if unlisted:
        return f"{unlisted[0]} is not listed in {DIGESTS_FILE}" + (f" ({len(unlisted)} such files)"
                                                                  if len(unlisted) > 1 else "")
    wanted = sorted(listed) if ranks is None else files_for_ranks(sorted(listed), ranks)
    for name in wanted:
        if name not in present:
            return f"{name} is listed in {DIGESTS_FILE} but missing"
        if digest_file(os.path.join(directory, name)) != listed[name]:
            return f"{name} does not match the SHA-256 digest recorded when it was saved"
    return None


def refuse_if_any(problem: str | None, source: str) -> None:
    """Raise UntrustedCheckpoint on every rank when any rank found a problem (so that no rank is left
    waiting in a collective while another has stopped); alone, when there is no process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        problems: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise UntrustedCheckpoint(f"finetune: refusing to load checkpoint {source}: {problem}. DeepSpeed unpickles "
                                  "checkpoint files, so only files recorded at save are loaded. Delete that folder "
                                  "to resume from the one before it, or --set train.start_fresh=true.")


def load(engine: Any, directory: str, source: str, ranks: set[int] | None = None, verify: bool = True) -> TrainState:
    """Load a local checkpoint folder into the engine; returns its training state. The files the given
    ranks read are checked against the recorded digests first (verify=False: another rank on this
    node checks them; a collective either way). A checkpoint that cannot be read is named, with what
    to do about it."""
    refuse_if_any(untrusted(directory, ranks) if verify else None, source)
    try:
        engine.load_checkpoint(directory, tag=ENGINE_TAG)
        return TrainState.from_json(Path(directory, STATE_FILE).read_text())
    except Exception as error:
        raise RuntimeError(f"finetune: cannot resume from checkpoint {source}: {error!r}. Delete that folder "
                           "to resume from the one before it, or choose another train.run_name.") from error


def _state_of(checkpoint: Any) -> TrainState:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return TrainState.from_json(f.read().decode())


def _is_complete(checkpoint: Any) -> bool:
    import pyarrow.fs as pafs

    info = checkpoint.filesystem.get_file_info(f"{checkpoint.path}/{COMPLETE_FILE}")
    return info.type == pafs.FileType.File


def restore(engine: Any, found: str | None, context: WorkerContext) -> TrainState:
    """Load the newer of the context's registered checkpoint (Ray Train's) and the newest complete
    one found on storage (a registered one not marked complete only when there is no other); returns
    the training state (a fresh one when there is neither). Its files are verified before loading."""
    import pyarrow.fs
    import torch.distributed as dist

    registered = context.registered_checkpoint()
    checkpoint = registered
    if found:
        found_step = storage.read_json(storage.join(found, COMPLETE_FILE))["step"]
        if registered is None or not _is_complete(registered) or _state_of(registered).step < found_step:
            fs, path = storage.arrow_fs(found)
            checkpoint = context.checkpoint_at(path, fs)
    if checkpoint is None:
        return TrainState()
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        ranks = {dist.get_rank()} if dist.is_available() and dist.is_initialized() else None
        return load(engine, checkpoint.path, checkpoint.path, ranks)
    return _restore_remote(engine, checkpoint, context)


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


def _restore_remote(engine: Any, checkpoint: Any, context: WorkerContext) -> TrainState:
    """One download per node, by its local rank 0, of the files its ranks read, verified there
    against the recorded digests; read by every rank there, removed once all have loaded (Ray's
    shared as_directory() lets one rank delete it before another has read it)."""
    import torch.distributed as dist

    name = "trim-restore-" + hashlib.sha1(checkpoint.path.encode()).hexdigest()
    directory = os.path.join(tempfile.gettempdir(), name)
    first_on_node = context.local_rank() == 0
    ranks = _ranks_on_this_node()  # collective: every rank takes part
    problem = None
    if first_on_node:
        shutil.rmtree(directory, ignore_errors=True)
        try:
            _download(checkpoint, directory, ranks)
        except Exception as error:  # told to every rank below, so none waits for this one
            problem = f"cannot download it ({error!r})"
    refuse_if_any(problem, checkpoint.path)  # also the barrier: the files are all here now
    try:
        return load(engine, directory, checkpoint.path, ranks, verify=first_on_node)
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
