"""Stage 3, fine-tune: Ray Train workers with DeepSpeed on the TRIM cache, tracked in MLflow.

`run_finetune` (driver) builds the Ray Data input (cache -> tokenized rows) and a TorchTrainer;
`train_loop` (each worker) builds the model and the DeepSpeed engine, resumes from the newest
complete checkpoint if there is one (step count, data position within the epoch, MLflow run), trains,
checkpoints every N steps and exports a model directory at the end. No vision tower anywhere.

A checkpoint counts as complete once every rank has uploaded its part: rank 0 then writes
COMPLETE_FILE into it. Ray Train registers a checkpoint a moment after the upload, so a job killed in
between leaves a complete checkpoint that Ray does not know; the driver finds it and resumes there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipelines import storage
from pipelines.config import Recipe, TrainConfig

MATERIALIZE_BELOW_BYTES = 512 * 2**20
"""A cache smaller than this is tokenized once and kept in the object store for all epochs."""
WINDOW_MICRO_BATCHES = 8
"""Micro-batches per length-grouping window (LLaVA groups within mega-batches the same way)."""
STATE_FILE = "train_state.json"
COMPLETE_FILE = "complete.json"
ENGINE_TAG = "engine"
CHECKPOINT_PREFIX = "checkpoint_step_"


@dataclass
class StepPlan:
    """How many optimizer steps the run takes, from the cache size and the batch geometry."""

    samples: int
    micro_batches_per_epoch: int
    steps_per_epoch: float
    total_steps: int
    warmup_steps: int
    global_batch: int


def plan_steps(samples: int, cfg: TrainConfig) -> StepPlan:
    """Each worker sees samples // workers rows an epoch (Ray Data's equal split), in windows of
    WINDOW_MICRO_BATCHES micro-batches; global batch = micro-batch x accumulation x workers."""
    per_worker = samples // cfg.num_workers
    window = cfg.micro_batch_size * WINDOW_MICRO_BATCHES
    micro = (per_worker // window) * WINDOW_MICRO_BATCHES + math.ceil((per_worker % window) / cfg.micro_batch_size)
    steps_per_epoch = micro / cfg.grad_accum_steps
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return StepPlan(samples=samples, micro_batches_per_epoch=micro, steps_per_epoch=steps_per_epoch,
                    total_steps=total, warmup_steps=int(total * cfg.warmup_ratio),
                    global_batch=cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def deepspeed_config(path: str, cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON with its "auto" fields filled from the train config: batch sizes, and
    bf16 on GPU (fp32 on CPU, where bf16 matmuls are slow and gloo has no bf16 all-reduce)."""
    config = json.loads(Path(path).read_text())
    config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    config["gradient_accumulation_steps"] = cfg.grad_accum_steps
    config["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers
    config.setdefault("bf16", {})["enabled"] = bool(cfg.use_gpu)
    return config


# Worker side --------------------------------------------------------------------------------


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _save_checkpoint(engine, state: dict, metrics: dict, rank: int, run_dir: str) -> None:
    """Every rank writes its DeepSpeed shards; Ray Train gathers them into one checkpoint directory.
    Once all ranks have uploaded (the barrier), rank 0 marks it complete."""
    import ray.train
    import torch.distributed as dist

    name = checkpoint_dir_name(state["step"])
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=ENGINE_TAG)
        if rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name)
    dist.barrier()  # report() returns once this rank's upload is done, not every rank's
    if rank == 0:
        storage.write_json(storage.join(run_dir, name, COMPLETE_FILE), state)


def _read_state(checkpoint) -> dict:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return json.loads(f.read())


def _load(engine, directory: str, source: str) -> dict:
    """Load a checkpoint directory into the engine; returns its training state. A checkpoint that
    cannot be read is named, with what to do about it."""
    try:
        engine.load_checkpoint(directory, tag=ENGINE_TAG)
        return json.loads(Path(directory, STATE_FILE).read_text())
    except Exception as error:
        raise RuntimeError(f"finetune: cannot resume from checkpoint {source}: {error!r}. Delete that folder "
                           "to resume from the one before it, or choose another train.run_name.") from error


def _restore(engine, registered, found: str | None) -> dict:
    """Load the newer of Ray Train's registered checkpoint and the newest complete one the driver
    found on storage; returns the training state (a fresh one when there is neither)."""
    import pyarrow.fs
    import ray.train
    import torch.distributed as dist

    checkpoint = registered
    if found:
        found_step = storage.read_json(storage.join(found, COMPLETE_FILE))["step"]
        if registered is None or _read_state(registered)["step"] < found_step:
            fs, path = storage.arrow_fs(found)
            checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "micro_in_epoch": 0, "mlflow_run_id": None, "first_loss": None}
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return _load(engine, checkpoint.path, checkpoint.path)
    # One download per node, by its local rank 0, read by every rank there, removed once all have
    # loaded (Ray's shared as_directory() lets one rank delete it before another has read it).
    name = "trim-restore-" + hashlib.sha1(checkpoint.path.encode()).hexdigest()
    directory = os.path.join(tempfile.gettempdir(), name)
    first_on_node = ray.train.get_context().get_local_rank() == 0
    if first_on_node:
        shutil.rmtree(directory, ignore_errors=True)
        checkpoint.to_directory(directory)
    dist.barrier()
    try:
        return _load(engine, directory, checkpoint.path)
    finally:
        dist.barrier()
        if first_on_node:
            shutil.rmtree(directory, ignore_errors=True)


def _export(engine, model, tokenizer, zero_stage: int, destination: str, rank: int) -> None:
    """Write the final model directory (gathering ZeRO-3 shards first) to local disk or S3."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as directory:
        model.save(directory, tokenizer=tokenizer, state_dict=state)
        fs, path = storage.fsspec_fs(destination)
        if storage.exists(destination):
            fs.rm(path, recursive=True)
        fs.put(directory.rstrip("/") + "/", path, recursive=True)


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from pipelines.tracking import Tracker
    from pipelines.train_data import RowsCollate, collate, group_by_length
    from trim.model import LlavaTrim

    cfg = TrainConfig(**config["train"])
    plan = StepPlan(**config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    model = LlavaTrim.from_llm(config["llm"], config["feature_dim"], config["projector"] or None,
                               settings=config["model_settings"])
    model.set_trainable(cfg.train_llm)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    tokenizer = AutoTokenizer.from_pretrained(config["llm"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.warmup_steps, plan.total_steps))
    ds_config = config["deepspeed"]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    state = _restore(engine, ray.train.get_checkpoint(), config["resume_from"])
    tracker = Tracker(config["tracking_uri"], config["experiment"], enabled=rank == 0)
    if rank == 0:
        resumed = state["mlflow_run_id"] is not None
        state["mlflow_run_id"] = tracker.start(cfg.run_name, state["mlflow_run_id"])
        if not resumed:
            tracker.log_params({**config["recipe"], "plan": asdict(plan)})
            tracker.log_dict(config["cache_manifest"], "cache_manifest.json")
        else:
            print(f"finetune: resumed at step {state['step']} (epoch {state['epoch']}, "
                  f"micro-batch {state['micro_in_epoch']}), MLflow run {state['mlflow_run_id']}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    window_rows = cfg.micro_batch_size * WINDOW_MICRO_BATCHES
    def windows():
        return shard.iter_torch_batches(batch_size=window_rows, collate_fn=RowsCollate(), prefetch_batches=2)

    preloaded = list(windows()) if cfg.preload else None
    started, tokens_seen, visual_seen, samples_seen, losses = time.time(), 0, 0, 0, []
    step_started = time.time()
    engine.train()
    while state["step"] < plan.total_steps:
        micro_index = 0
        for window_index, batch in enumerate(preloaded if preloaded is not None else windows()):
            chunks = group_by_length(batch, cfg.micro_batch_size, seed=hash((cfg.seed, state["epoch"], window_index)),
                                     enabled=cfg.group_by_length)
            for chunk in chunks:
                micro_index += 1
                if micro_index <= state["micro_in_epoch"] or state["step"] >= plan.total_steps:
                    continue  # resuming: this data was consumed before the checkpoint
                boundary = engine.is_gradient_accumulation_boundary()
                loss = engine(collate(chunk, pad_id))
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                tokens_seen += sum(r["length"] for r in chunk)
                visual_seen += sum(r["visual"].shape[0] for r in chunk)
                samples_seen += len(chunk)
                state["micro_in_epoch"] = micro_index
                if not boundary:
                    continue
                state["step"] += 1
                mean_loss = torch.tensor([sum(losses) / len(losses)])
                dist.all_reduce(mean_loss)
                mean_loss = float(mean_loss) / world
                losses = []
                state["first_loss"] = state["first_loss"] if state["first_loss"] is not None else mean_loss
                now = time.time()
                elapsed, step_time, step_started = now - started, now - step_started, now
                metrics = {"loss": mean_loss, "lr": scheduler_lr(engine), "step": state["step"], "step_time_s": step_time,
                           "tokens_per_s": tokens_seen * world / max(elapsed, 1e-9),
                           "visual_tokens_per_sample": visual_seen / max(samples_seen, 1)}
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=state["step"])
                if rank == 0 and (state["step"] % 10 == 0 or state["step"] in (1, plan.total_steps)):
                    print(f"finetune: step {state['step']}/{plan.total_steps} loss {mean_loss:.4f} "
                          f"lr {metrics['lr']:.2e} tokens/s {metrics['tokens_per_s']:.0f}", flush=True)
                if state["step"] % cfg.checkpoint_every == 0 or state["step"] == plan.total_steps:
                    _save_checkpoint(engine, state, {**metrics, "first_loss": state["first_loss"]}, rank,
                                     config["run_dir"])
        state["epoch"] += 1
        state["micro_in_epoch"] = 0
        if micro_index == 0:
            raise RuntimeError("finetune: the training data is empty (is the cache complete?)")

    _export(engine, model, tokenizer, ds_config["zero_optimization"]["stage"], config["export_dir"], rank)
    if rank == 0:
        tracker.set_tags({"model_dir": config["export_dir"]})
        tracker.end()


def scheduler_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"]) if hasattr(engine.optimizer, "param_groups") else 0.0


# Driver side --------------------------------------------------------------------------------


def tokenized_dataset(cache: str, llm_path: str, max_length: int):
    """The cache as a Ray Data dataset of tokenized rows (tokenized on the fly, in small tasks)."""
    import ray

    from pipelines.train_data import Tokenize

    fs, path = storage.arrow_fs(cache)
    files = [storage.join(path, n) for n in storage.listdir(cache, ".parquet") if n.startswith("part-")]
    columns = ["id", "conversations", "tokens", "num_tokens", "token_dim"]
    dataset = ray.data.read_parquet(files, filesystem=fs, columns=columns, num_cpus=0.25)
    return dataset.map_batches(Tokenize, fn_constructor_kwargs={"llm_path": llm_path, "max_length": max_length},
                               batch_size=64, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25,
                               batch_format="numpy")


RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Where Ray Train lists the checkpoints it registered in a run directory."""


def find_resume_point(run_dir: str, log=print) -> str | None:
    """The newest complete checkpoint under run_dir (registered with Ray Train or not), or None.
    Unregistered checkpoints older than it are removed (`remove_unregistered_before`)."""
    names = [n for n in storage.listdir(run_dir) if n.startswith(CHECKPOINT_PREFIX)]
    complete = [n for n in names if storage.exists(storage.join(run_dir, n, COMPLETE_FILE))]
    if not complete:
        return None
    newest = max(complete)  # the names sort by step
    remove_unregistered_before(run_dir, newest, log)
    return storage.join(run_dir, newest)


def remove_unregistered_before(run_dir: str, newest: str, log=print) -> None:
    """Delete the checkpoints older than `newest` that Ray Train never registered (the job was killed
    first, or one was resumed from): nothing would ever use or clean them up otherwise."""
    snapshot = storage.join(run_dir, RAY_SNAPSHOT_FILE)
    try:
        registered = ({r["checkpoint_dir_name"] for r in storage.read_json(snapshot)["checkpoint_results"]}
                      if storage.exists(snapshot) else set())
    except (KeyError, TypeError, ValueError) as error:
        log(f"finetune: cannot read {snapshot} ({error!r}); keeping every checkpoint")
        return
    for name in storage.listdir(run_dir):
        if name.startswith(CHECKPOINT_PREFIX) and name < newest and name not in registered:
            log(f"finetune: removing {name}, a checkpoint Ray Train never registered, older than {newest}")
            storage.remove(storage.join(run_dir, name))


def run_finetune(recipe: Recipe, tracking_uri: str, log=print):
    """Train (or resume) the run `recipe.train.run_name`; returns the Ray Train result."""
    import pyarrow.fs as pafs
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, paths = recipe.train, recipe.paths
    manifest = storage.read_json(storage.join(paths.cache, "manifest.json"))
    plan = plan_steps(manifest["samples"], cfg)
    run_dir = storage.join(paths.checkpoints, cfg.run_name)
    export_dir = storage.join(run_dir, "model")
    log(f"finetune: {manifest['samples']} samples, {cfg.num_workers} workers, global batch {plan.global_batch}, "
        f"{plan.total_steps} steps; mean visual tokens/sample {manifest['kept']['mean_tokens']:.1f} "
        f"(of {manifest['encoder']['num_patches']})")
    loop_config = {
        "train": asdict(cfg), "plan": asdict(plan), "llm": paths.llm, "projector": paths.projector,
        "feature_dim": manifest["encoder"]["feature_dim"], "deepspeed": deepspeed_config(cfg.deepspeed_config, cfg),
        "model_settings": {"trim": manifest["trim"], "encoder": manifest["encoder"], "recipe": recipe.name},
        "tracking_uri": tracking_uri, "experiment": f"trim-llava-{recipe.name}", "recipe": recipe.to_dict(),
        "cache_manifest": manifest, "export_dir": export_dir, "run_dir": run_dir,
        "resume_from": find_resume_point(run_dir, log),
    }
    storage_fs, storage_path = None, paths.checkpoints
    if storage.is_s3(paths.checkpoints):
        fs, storage_path = storage.fsspec_fs(paths.checkpoints)
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    else:
        storage_path = os.path.abspath(paths.checkpoints)
    dataset = tokenized_dataset(paths.cache, paths.llm, cfg.max_length)
    if manifest["cache_bytes"] < MATERIALIZE_BELOW_BYTES:
        dataset = dataset.materialize()  # later epochs then stream from memory, not from the files
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint:  # the checkpoint resumed from, if Ray Train never registered it, is spent now
        remove_unregistered_before(run_dir, os.path.basename(result.checkpoint.path.rstrip("/")), log)
    return result, export_dir
