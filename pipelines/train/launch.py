"""Stage 3, fine-tune (driver side): the TRIM cache's light index (pipelines.train.data.sample_index), and a
TorchTrainer whose workers run `pipelines.train.worker.train_loop` (each reads its rows in the epoch's seeded
global order; DeepSpeed, checkpoints, MLflow). No vision tower anywhere.

The same train.run_name resumes from the newest complete checkpoint (see pipelines/train/checkpoints.py):
step count, data position within the epoch and MLflow run continue.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipelines import storage
from pipelines.config import PathsConfig, Recipe
from pipelines.manifests import CacheManifest
from pipelines.tracking_store import experiment_name
from pipelines.train import checkpoints
from pipelines.train.engine import deepspeed_config
from pipelines.train.identity import run_identity
from pipelines.train.plan import TrainJob, plan_steps
from trim.formats import check_vision_settings, read_vision_settings

logger = logging.getLogger(__name__)

def train_job(recipe: Recipe, tracking_uri: str, cache: str | None = None) -> TrainJob:
    """The workers' spec: plan, model inputs, DeepSpeed config, tracking, where to resume from.
    `cache`: the cache version folder trained on (default: paths.cache's current version)."""
    cfg, paths = recipe.train, recipe.paths
    manifest = CacheManifest.read(cache or paths.cache)
    plan = plan_steps(manifest.samples, manifest.visual_samples, cfg)
    run_dir = paths.run_dir(cfg.run_name)
    # The starting checkpoint's vision settings (tower, layer, widths) must be the cache's encoder's.
    check_vision_settings(read_vision_settings(paths.llm, paths.projector or None), manifest.encoder)
    logger.info("%d samples, %d workers, global batch %d, %d steps; mean visual tokens/sample %.1f (of %d)",
                manifest.samples, cfg.num_workers, plan.global_batch, plan.total_steps, manifest.kept.mean_tokens,
                manifest.encoder["num_patches"])
    return TrainJob(
        train=cfg, plan=plan, llm=paths.llm, projector=paths.projector,
        feature_dim=manifest.encoder["feature_dim"], deepspeed=deepspeed_config(cfg.deepspeed_config, cfg),
        model_settings={"trim": manifest.trim, "encoder": manifest.encoder, "recipe": recipe.name},
        tracking_uri=tracking_uri, experiment=experiment_name(recipe.name), recipe=recipe.to_dict(),
        registered_model=cfg.registered_model or experiment_name(recipe.name),
        cache_manifest=manifest.to_dict(), run_dir=run_dir, export_dir=paths.model_dir(cfg.run_name),
        identity=run_identity(cfg, manifest.to_dict(), paths.llm, paths.projector))


def run_finetune(job: TrainJob, paths: PathsConfig, cache: str) -> tuple[Any, str]:
    """Train (or resume) the run `job` describes on `cache` (the cache version folder it was planned on);
    returns (Ray Train result, model directory). pipelines.train.runs decides whether to run at all."""
    import pyarrow.fs as pafs
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.data import sample_index
    from pipelines.train.worker import SAMPLE_INDEX_KEY, train_loop

    cfg = job.train
    logger.info("training on the cache at %s", cache)
    resume_from = checkpoints.find_resume_point(job.run_dir)  # also removes spent leftovers
    if resume_from:
        logger.info("resuming from %s", resume_from)
    storage_fs, storage_path = None, paths.checkpoints
    if storage.is_s3(paths.checkpoints):
        fs, storage_path = storage.fsspec_fs(paths.checkpoints)
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    else:
        storage_path = os.path.abspath(paths.checkpoints)
    # Light columns only: each worker orders every epoch from them and reads (and tokenizes) its own
    # rows, so the order is global, seeded and resumable, and visual tokens never cross the driver.
    index = sample_index(cache)
    if (len(index), int(index.is_image.sum())) != (job.plan.samples, job.cache_manifest["visual_samples"]):
        # the plan counts the manifest's samples: the order must hold the same, or the steps would not match
        raise RuntimeError(f"finetune: the cache at {cache} holds {len(index)} samples, "
                           f"{int(index.is_image.sum())} with visual tokens, but its manifest records "
                           f"{job.plan.samples} and {job.cache_manifest['visual_samples']}")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**job.to_dict(), SAMPLE_INDEX_KEY: index},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       # A lost worker: Ray Train restarts the group in this job, and each
                                       # worker resumes from the newest checkpoint (pipelines.train.worker.train_loop).
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint:  # the checkpoint resumed from, if Ray Train never registered it, is spent now
        checkpoints.remove_unregistered_before(job.run_dir, os.path.basename(result.checkpoint.path.rstrip("/")))
    return result, job.export_dir
