"""Stage 3, fine-tune (driver side): the TRIM cache as tokenized Ray Data rows, and a TorchTrainer whose
workers run `train_worker.train_loop` (DeepSpeed, checkpoints, MLflow). No vision tower anywhere.

The same train.run_name resumes from the newest complete checkpoint (see pipelines/checkpoints.py):
step count, data position within the epoch and MLflow run continue.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipelines import checkpoints, storage
from pipelines.config import Recipe
from pipelines.manifests import CacheManifest
from pipelines.tracking_store import experiment_name
from pipelines.train_engine import deepspeed_config
from pipelines.train_plan import TrainJob, plan_steps, run_identity
from trim.formats import check_vision_settings, read_vision_settings, tokenizer_path

logger = logging.getLogger(__name__)

MATERIALIZE_BELOW_BYTES = 512 * 2**20
"""A cache smaller than this is tokenized once and kept in the object store for all epochs."""


def tokenized_dataset(cache: str, llm_path: str, max_length: int, tokenizers: int = 1) -> Any:
    """The cache as a Ray Data dataset of tokenized rows, tokenized on the fly by a pool of
    `tokenizers` actors (sized by the number of training workers, so input keeps up as they grow)."""
    import ray

    from pipelines.train_data import Tokenize

    fs, path = storage.arrow_fs(cache)
    files = [storage.join(path, n) for n in storage.listdir(cache, ".parquet") if n.startswith("part-")]
    columns = ["index", "id", "conversations", "tokens", "num_tokens", "token_dim"]
    dataset = ray.data.read_parquet(files, filesystem=fs, columns=columns, num_cpus=0.25)
    return dataset.map_batches(Tokenize, fn_constructor_kwargs={"llm_path": llm_path, "max_length": max_length},
                               batch_size=64, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=tokenizers),
                               num_cpus=0.25,
                               batch_format="numpy")


def train_job(recipe: Recipe, tracking_uri: str) -> TrainJob:
    """The workers' spec: plan, model inputs, DeepSpeed config, tracking, where to resume from."""
    cfg, paths = recipe.train, recipe.paths
    manifest = CacheManifest.read(paths.cache)
    plan = plan_steps(manifest.samples, cfg)
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


def run_finetune(recipe: Recipe, tracking_uri: str) -> tuple[Any, str]:
    """Train (or resume) the run `recipe.train.run_name`; returns (Ray Train result, model directory)."""
    import pyarrow.fs as pafs
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train_worker import train_loop

    cfg, paths = recipe.train, recipe.paths
    job = train_job(recipe, tracking_uri)
    resume_from = checkpoints.find_resume_point(job.run_dir)  # also removes spent leftovers
    if resume_from:
        logger.info("resuming from %s", resume_from)
    storage_fs, storage_path = None, paths.checkpoints
    if storage.is_s3(paths.checkpoints):
        fs, storage_path = storage.fsspec_fs(paths.checkpoints)
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    else:
        storage_path = os.path.abspath(paths.checkpoints)
    # One tokenizer actor per two training workers keeps up with GPU steps (a few ms of CPU per sample).
    dataset = tokenized_dataset(paths.cache, tokenizer_path(paths.llm), cfg.max_length,
                                tokenizers=max(1, cfg.num_workers // 2))
    if job.cache_manifest["cache_bytes"] < MATERIALIZE_BELOW_BYTES:
        dataset = dataset.materialize()  # later epochs then stream from memory, not from the files
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       # A lost worker: Ray Train restarts the group in this job, and each
                                       # worker resumes from the newest checkpoint (train_worker.train_loop).
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint:  # the checkpoint resumed from, if Ray Train never registered it, is spent now
        checkpoints.remove_unregistered_before(job.run_dir, os.path.basename(result.checkpoint.path.rstrip("/")))
    return result, job.export_dir
