"""Fine-tuning runs by name: a name can follow the cache ({cache_version}), a resume is checked against
its checkpoint before any worker starts, and the runs a schedule leaves behind are retained by rule.

A train.run_name holding {cache_version} (what the scheduled retraining uses) is named after the cache
version it trains on, so a new cache (changed mixture, images, CLIP weights or settings) starts a new
run, a rerun on the same cache resumes its run, and a run already complete on it (its last step
checkpointed, its model exported) is not run again. Retention: the runs of such a name are kept while
their cache version is (the cache's CURRENT.json history, the newest precompute.keep_versions); once
a run has exported its model, the others whose cache version is gone are removed, checkpoints and
model. MLflow keeps their runs and the registered model versions (a copy of each model). A plain
name is never removed, and resuming it on another cache is refused unless train.start_fresh.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from pipelines import storage
from pipelines.config import PathsConfig, Recipe
from pipelines.manifests import CacheManifest, read_current, resolve_output
from pipelines.train import checkpoints
from pipelines.train.identity import resume_differences
from pipelines.train.launch import run_finetune, train_job
from pipelines.train.plan import TrainJob
from pipelines.train.run_names import CACHE_VERSION, cache_version_of_run, expand_run_name
from trim.model_files import SETTINGS_FILE

logger = logging.getLogger(__name__)


@dataclass
class FinetuneOutcome:
    """What a finetune job did."""

    run_name: str
    """The run: train.run_name with {cache_version} replaced."""
    model_dir: str
    """Where the run's model is (written at its end)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last reported metrics (loss, first_loss, step...)."""
    error: BaseException | None = None
    """Why training failed (Ray Train's result error); None when it did not."""
    already_complete: bool = False
    """The run was complete on this cache before the job: nothing was trained or written."""
    removed_runs: list[str] = field(default_factory=list)
    """Runs of the same {cache_version} name removed by retention after this one."""


def resolve_run_name(recipe: Recipe, cache: str | None = None) -> Recipe:
    """The recipe with {cache_version} in train.run_name replaced by the version of `cache` (a cache
    version folder; default: paths.cache's current version); the recipe itself for a plain name. The
    jobs that find a run by its name (finetune, evaluate, export, report) resolve it this way."""
    template = recipe.train.run_name
    if CACHE_VERSION not in template:
        expand_run_name(template, "")  # refuses any other placeholder
        return recipe
    version = CacheManifest.read(cache or recipe.paths.cache).version
    train = dataclasses.replace(recipe.train, run_name=expand_run_name(template, version))
    return dataclasses.replace(recipe, train=train)


def _saved(checkpoint: str) -> dict[str, Any]:
    """The training state a complete checkpoint records (its COMPLETE_FILE)."""
    return storage.read_json(storage.join(checkpoint, checkpoints.COMPLETE_FILE))


def check_resume(job: TrainJob, checkpoint: str | None) -> None:
    """Refuse, before any worker starts, to resume `checkpoint` (the run's newest complete one) with
    another cache, training settings or number of workers, naming what differs (the workers check
    again, after a restart too)."""
    if checkpoint is None or job.train.start_fresh:
        return
    state = _saved(checkpoint)
    differs = _differences(job, state)
    if not differs:
        return
    hint = ""
    if any(d.startswith("cache.") for d in differs):
        was = (state.get("identity") or {}).get("cache", {}).get("version") or "an unversioned cache"
        hint = (f" The checkpoint was trained on {was}, the current cache is {job.identity['cache']['version']}; "
                f"runs that should follow the cache name themselves after it: train.run_name=<name>-{CACHE_VERSION}.")
    if "schedule" in differs:
        hint += (" The learning-rate schedule's rules changed since that checkpoint (pipelines/train/identity.py, "
                 "SCHEDULE_RULES: transformers' cosine schedule with warmup, as LLaVA's Trainer), so its run "
                 "cannot continue on the schedule it began with.")
    if "order" in differs:
        hint += (" The epoch order's rules changed since that checkpoint (pipelines/train/order.py, order_rules: "
                 "steps drawn at random as LLaVA's, packed ones split with even token totals), so its epoch "
                 "cannot continue as it began.")
    raise RuntimeError(f"finetune: run {job.train.run_name!r} was checkpointed with other settings "
                       f"(differ: {', '.join(differs)}); resuming would mix them. Use another train.run_name, "
                       f"or --set train.start_fresh=true to train it again from step 0.{hint}")


def already_complete(job: TrainJob, checkpoint: str | None) -> dict[str, Any] | None:
    """The final training state of a run that needs no more work: its newest complete checkpoint is at
    the plan's last step with this job's identity, and its model is exported; None otherwise."""
    if checkpoint is None or job.train.start_fresh or not storage.exists(storage.join(job.export_dir, SETTINGS_FILE)):
        return None
    state = _saved(checkpoint)
    if state.get("step", 0) < job.plan.total_steps:
        return None
    return None if _differences(job, state) else state


def _differences(job: TrainJob, state: dict[str, Any]) -> list[str]:
    """What keeps the training state of a complete checkpoint from going on as `job`."""
    return resume_differences(state.get("identity"), {**job.identity, "workers": job.train.num_workers},
                              state.get("step", 0), state.get("micro_in_epoch", 0), job.plan)


def remove_superseded_runs(template: str, paths: PathsConfig, trained_on: str) -> list[str]:
    """Retention of the runs named by `template` (it holds {cache_version}): remove those whose cache
    version is neither `trained_on` nor one the cache keeps. Returns the names removed."""
    kept = {trained_on, *read_current(paths.cache).get("history", [])}
    removed = []
    for name in storage.listdir(paths.checkpoints):
        version = cache_version_of_run(template, name)
        if version is not None and version not in kept:
            storage.remove(storage.join(paths.checkpoints, name))
            removed.append(name)
    if removed:
        logger.info("removed %d run(s) whose cache version is no longer kept: %s (their MLflow runs and "
                    "registered models stay)", len(removed), ", ".join(removed))
    return removed


@dataclass
class FinetuneRun:
    """One finetune job's run, resolved once: the cache it trains on, its name, the workers' spec."""

    template: str
    """train.run_name as the recipe gives it (may hold {cache_version})."""
    recipe: Recipe
    """The recipe with the run's name resolved."""
    cache: str
    """The cache version folder trained on, read once (a precompute finishing meanwhile changes nothing)."""
    job: TrainJob
    """The workers' spec (pipelines.train.launch.train_job)."""

    @property
    def name(self) -> str:
        return self.recipe.train.run_name


def prepare_run(recipe: Recipe, tracking_uri: str) -> FinetuneRun:
    """Resolve the current cache and the run's name, and build the workers' spec, once."""
    cache = resolve_output(recipe.paths.cache)
    resolved = resolve_run_name(recipe, cache)
    logger.info("run %s on the cache at %s", resolved.train.run_name, cache)
    return FinetuneRun(recipe.train.run_name, resolved, cache, train_job(resolved, tracking_uri, cache))


def finetune(run: FinetuneRun) -> FinetuneOutcome:
    """Train, resume or (a {cache_version} run already complete) skip `run`; then apply the retention
    of {cache_version} runs."""
    job, name, paths = run.job, run.name, run.recipe.paths
    newest = checkpoints.newest_complete(job.run_dir)
    scheduled = CACHE_VERSION in run.template
    final = already_complete(job, newest) if scheduled else None
    if final is not None:
        logger.info("run %s is complete on this cache (step %d of %d; model in %s): nothing to train", name,
                    final["step"], job.plan.total_steps, job.export_dir)
        outcome = FinetuneOutcome(name, job.export_dir, {"step": final["step"], "first_loss": final.get("first_loss")},
                                  already_complete=True)
    else:
        check_resume(job, newest)
        result, model_dir = run_finetune(job, paths, run.cache)
        outcome = FinetuneOutcome(name, model_dir, dict(result.metrics or {}), result.error)
    if scheduled and outcome.error is None:
        outcome.removed_runs = remove_superseded_runs(run.template, paths, job.cache_manifest["version"])
    return outcome
