"""The fine-tuning worker (one per Ray Train rank), in layers as litgpt's finetune: `train_loop`
sets up (job spec, model and engine, restore, tracking), `fit` only trains, `export` writes the model.

Rank-0 side effects (MLflow, progress lines, the complete marker, the export's write) hang on one
flag, `is_master`, as nanoGPT's master_process; other ranks log warnings only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipelines.tracking import Tracker
from pipelines.train import checkpoints
from pipelines.train.data import CacheReader, SampleIndex, collate, micro_batches, positions
from pipelines.train.engine import Built
from pipelines.train.identity import resume_differences
from pipelines.train.order import epoch_micro_batches, rank_micro_batches
from pipelines.train.plan import TrainJob, TrainState
from trim.batching import Batch

logger = logging.getLogger(__name__)
SAMPLE_INDEX_KEY = "sample_index"
"""The train_loop_config key of the driver's SampleIndex (beside the TrainJob's fields)."""


@dataclass
class Progress:
    """Running totals for the metrics of the steps since the run (or resume) started."""

    clock: Callable[[], float] = time.time
    started: float = field(default_factory=time.time)
    step_started: float = field(default_factory=time.time)
    tokens: int = 0
    visual: int = 0
    samples: int = 0
    steps_here: int = 0
    real_positions: int = 0
    all_positions: int = 0
    losses: list[float] = field(default_factory=list)

    def add(self, chunk: list[dict], batch: Batch, loss: float) -> None:
        self.losses.append(loss)
        real, slots = positions(batch)
        self.real_positions += real
        self.all_positions += slots
        self.tokens += sum(r["length"] for r in chunk)
        self.visual += sum(r["visual"].shape[0] for r in chunk)
        self.samples += len(chunk)

    def start_step(self) -> None:
        """The next step starts now: what was done after the last one (metrics sent, a checkpoint
        saved) is left out of its step_time_s (tokens_per_s, over all the time since the start,
        keeps it)."""
        self.step_started = self.clock()

    def eta(self, step: int, total: int) -> str:
        """Time left at the pace of the steps since the start (or resume), as h:mm:ss."""
        seconds = int((time.time() - self.started) / max(self.steps_here, 1) * max(total - step, 0))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def step_metrics(self, mean_loss: float, lr: float, world: int) -> dict[str, float]:
        """This step's metrics; step_time_s runs from the end of the previous step's bookkeeping
        (start_step) to here."""
        now = self.clock()
        self.steps_here += 1
        elapsed, step_time, self.step_started = now - self.started, now - self.step_started, now
        self.losses = []
        return {"loss": mean_loss, "lr": lr, "step_time_s": step_time,
                "tokens_per_s": self.tokens * world / max(elapsed, 1e-9),
                "visual_tokens_per_sample": self.visual / max(self.samples, 1),
                "padding_share": 1 - self.real_positions / max(self.all_positions, 1)}


METRICS_EVERY_S = 10.0
"""How often (at most) the training loop sends its metrics to the tracker, besides each checkpoint."""


def _mean_over_ranks(values: list[float], world: int) -> float:
    import torch.distributed as dist

    mean = torch.tensor([sum(values) / len(values)])
    dist.all_reduce(mean)
    return float(mean) / world


class MetricsLog:
    """Each step's metrics, sent to the tracker in one request every METRICS_EVERY_S seconds and
    at each checkpoint (so a resumed run's history has no gap): a request per step to MLflow took
    ~10% of rank 0's time at ~110 ms steps (py-spy, sqlite store), and every rank waits for rank 0."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.sent = tracker, time.monotonic()
        self.pending: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, metrics: dict[str, float], flush: bool) -> None:
        self.pending.append((step, metrics))
        if flush or time.monotonic() - self.sent >= METRICS_EVERY_S:
            self.tracker.log_metric_steps(self.pending)
            self.pending, self.sent = [], time.monotonic()


EpochBatches = Callable[[int, int], Iterable[tuple[int, list[dict]]]]
"""(epoch, micro-batches to skip) -> this worker's (position in the epoch, rows) from there on."""


def fit(built: Built, job: TrainJob, state: TrainState, epoch_batches: EpochBatches,
        tracker: Tracker, is_master: bool, world: int) -> None:
    """Train until job.plan.total_steps: each epoch's micro-batches, an optimizer step at each
    accumulation boundary, metrics and a checkpoint every train.checkpoint_every steps."""
    cfg, plan, engine = job.train, job.plan, built.engine
    pad_id = built.tokenizer.pad_token_id if built.tokenizer.pad_token_id is not None else built.tokenizer.eos_token_id
    progress = Progress()
    metrics_log = MetricsLog(tracker)
    engine.train()
    while state.step < plan.total_steps:
        seen = 0
        for seen, chunk in epoch_batches(state.epoch, state.micro_in_epoch):
            if state.step >= plan.total_steps:
                break
            boundary = engine.is_gradient_accumulation_boundary()
            batch = collate(chunk, pad_id, cfg.packing, cfg.max_length)
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            progress.add(chunk, batch, loss.item())
            state.micro_in_epoch = seen
            if not boundary:
                continue
            state.step += 1
            mean_loss = _mean_over_ranks(progress.losses, world)
            state.first_loss = state.first_loss if state.first_loss is not None else mean_loss
            metrics = progress.step_metrics(mean_loss, built.lr(), world)
            checkpoint_due = state.step % cfg.checkpoint_every == 0 or state.step == plan.total_steps
            metrics_log.add(state.step, metrics, flush=checkpoint_due)
            if is_master and (state.step % 10 == 0 or state.step in (1, plan.total_steps)):
                logger.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f ETA %s", state.step, plan.total_steps,
                            mean_loss, metrics["lr"], metrics["tokens_per_s"],
                            progress.eta(state.step, plan.total_steps))
            if checkpoint_due:
                # a run MLflow could only start late is the one a resume continues
                state.mlflow_run_id = tracker.run_id or state.mlflow_run_id
                checkpoints.save(engine, state, {**metrics, "step": state.step, "first_loss": state.first_loss},
                                 job.run_dir, is_master)
            progress.start_step()
        if seen == 0 and state.micro_in_epoch == 0:
            raise RuntimeError("finetune: the training data is empty (is the cache complete?)")
        state.epoch += 1
        state.micro_in_epoch = 0


def _start_tracking(tracker: Tracker, job: TrainJob, state: TrainState) -> None:
    """Start (or continue) the run; the recipe, the cache manifest and the TRIM config go in as params
    and artifacts each time (the same values: a resume leaves them as they were, or adds what a
    first attempt could not log)."""
    resumed = state.mlflow_run_id is not None
    state.mlflow_run_id = tracker.start(job.train.run_name, state.mlflow_run_id)
    tracker.log_params({**job.recipe, "plan": asdict(job.plan)})
    tracker.log_dict(job.recipe, "recipe.json")
    tracker.log_dict(job.cache_manifest, "cache_manifest.json")
    tracker.log_dict(job.cache_manifest.get("trim", {}), "trim_config.json")
    tracker.start_system_metrics()
    if resumed:
        logger.info("resumed at step %d (epoch %d, micro-batch %d), MLflow run %s", state.step, state.epoch,
                    state.micro_in_epoch, state.mlflow_run_id)


def _restore(built: Built, job: TrainJob, world: int) -> TrainState:
    """The state to start from: fresh, or the newest checkpoint if it belongs to this run. Not the
    driver's view from before the job: after a lost worker Ray Train restarts the group, and the newest
    complete checkpoint is then one this job wrote."""
    import ray.train

    identity = {**job.identity, "workers": world}
    if job.train.start_fresh:
        return TrainState(identity=identity)
    state = checkpoints.restore(built.engine, ray.train.get_checkpoint(), checkpoints.newest_complete(job.run_dir))
    differs = []
    if state.step:
        differs = resume_differences(state.identity, identity, state.step, state.micro_in_epoch, job.plan)
    if differs:
        raise RuntimeError(f"finetune: run {job.train.run_name!r} was checkpointed with other settings "
                           f"(differ: {', '.join(differs)}); resuming would mix them. Use another train.run_name, "
                           "or --set train.start_fresh=true to train it again from step 0.")
    state.identity = identity
    return state


def _epoch_batches(job: TrainJob, index: SampleIndex, rank: int, world: int) -> EpochBatches:
    """This worker's micro-batches of an epoch, in the epoch's seeded global order (train_order), read
    from the cache and tokenized here; with train.preload every sample is read once, up front."""
    from trim.formats import tokenizer_path

    cfg = job.train
    reader = CacheReader(index, tokenizer_path(job.llm), cfg.max_length, memo=cfg.preload)
    if cfg.preload:
        reader.read(range(len(index)))

    def epoch_batches(epoch: int, skip: int) -> Iterable[tuple[int, list[dict]]]:
        everyone = epoch_micro_batches(index.length, index.is_image, cfg.micro_batch_size, world,
                                       cfg.grad_accum_steps, cfg.seed, epoch, cfg.group_by_length, cfg.packing)
        mine = rank_micro_batches(everyone, rank, world)
        if len(mine) != job.plan.micro_batches_per_epoch:  # the plan's steps and LR schedule count on it
            raise RuntimeError(f"finetune: worker {rank} has {len(mine)} micro-batches in epoch {epoch}, the plan "
                               f"{job.plan.micro_batches_per_epoch}")
        return micro_batches(mine, reader.read, skip)
    return epoch_batches


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: set up, fit, export."""
    import ray.train

    from pipelines.logs import setup_logging
    from pipelines.train.engine import build, export

    job = TrainJob.from_dict({k: v for k, v in config.items() if k != SAMPLE_INDEX_KEY})
    index = config[SAMPLE_INDEX_KEY]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    is_master = rank == 0
    setup_logging(quiet=not is_master)
    torch.manual_seed(job.train.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    built = build(job)
    state = _restore(built, job, world)
    epoch_batches = _epoch_batches(job, index, rank, world)
    with Tracker(job.tracking_uri, job.experiment, enabled=is_master) as tracker:
        _start_tracking(tracker, job, state)
        fit(built, job, state, epoch_batches, tracker, is_master, world)
        export(built, job.export_dir, is_master, tracker, job.registered_model)
        tracker.set_tags({"model_dir": job.export_dir})
