"""Building what a worker trains: the model, its optimizer and schedule inside a DeepSpeed engine;
and writing the final model out. Nothing here loops or logs metrics (see train_worker.fit)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.config import TrainConfig
from pipelines.train.plan import StepPlan, TrainJob

logger = logging.getLogger(__name__)

CONSOLIDATED_FILE = "consolidated_16bit.bin"
"""The gathered ZeRO-3 weights, written by DeepSpeed on rank 0 before the export splits them."""


def deepspeed_config(path: str, cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON with its "auto" fields filled from the train config: batch sizes, and
    bf16 on GPU (fp32 on CPU, where bf16 matmuls are slow and gloo has no bf16 all-reduce)."""
    config = json.loads(Path(path).read_text())
    config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    config["gradient_accumulation_steps"] = cfg.grad_accum_steps
    config["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers
    config.setdefault("bf16", {})["enabled"] = bool(cfg.use_gpu)
    return config


@dataclass
class Built:
    """A worker's trainable parts."""

    model: Any
    """The LlavaTrim module (wrapped by the engine)."""
    tokenizer: Any
    """The LLM's tokenizer (saved with the export)."""
    engine: Any
    """The DeepSpeed engine: forward, backward, step, checkpoints."""
    zero_stage: int
    """ZeRO stage of the engine (3: parameters are partitioned and must be gathered to export)."""

    def lr(self) -> float:
        optimizer = self.engine.optimizer
        return float(optimizer.param_groups[0]["lr"]) if hasattr(optimizer, "param_groups") else 0.0


@contextlib.contextmanager
def zero3_init(ds_config: dict) -> Iterator[None]:
    """Under ZeRO-3, create the LLM's parameters already partitioned across the ranks (DeepSpeed's
    zero.Init, switched on by transformers' HfDeepSpeedConfig while a reference to it is alive) instead
    of building the whole model on every rank first, and load its checkpoint one file at a time
    (pipelines/train/zero3_load.py) instead of whole into rank 0's memory."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init sizes its partitions by DeepSpeed's view of the world: join the process group Ray
    # Train made (deepspeed.initialize would do it later, after the full model was built).
    deepspeed.init_distributed()
    from pipelines.train.zero3_load import load_partitioned
    from trim.llm_loading import using_llm_loader

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        with using_llm_loader(load_partitioned):
            yield
    finally:
        del keep_alive


def build(job: TrainJob) -> Built:
    """Model (LLM + projector), AdamW with warmup-cosine, wrapped in a DeepSpeed engine."""
    import deepspeed

    from trim.formats import load_llava_trim, tokenizer_path
    from trim.llm_tokenizer import load_llm_tokenizer

    cfg = job.train
    if cfg.use_gpu and torch.cuda.is_available():
        # fp32 matmuls that remain (loss, optimizer maths) on tensor cores; the weights are bf16.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if cfg.use_gpu else torch.float32
    with zero3_init(job.deepspeed):
        # An LLM + stage-1 projector, a LLaVA-1.5 checkpoint, a LlavaForConditionalGeneration one, or a
        # model this project exported (trim/formats/__init__.py tells them apart).
        model = load_llava_trim(job.llm, job.feature_dim, job.projector or None, dtype=dtype,
                                settings=job.model_settings, attn_implementation=cfg.attn_implementation or None,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    model.set_trainable(cfg.train_llm)
    tokenizer = load_llm_tokenizer(tokenizer_path(job.llm))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, job.plan)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=job.deepspeed)
    return Built(model=model, tokenizer=tokenizer, engine=engine,
                 zero_stage=int(job.deepspeed.get("zero_optimization", {}).get("stage", 0)))


def lr_scheduler(optimizer: torch.optim.Optimizer, plan: StepPlan) -> torch.optim.lr_scheduler.LambdaLR:
    """LLaVA's learning-rate schedule: transformers' cosine schedule with warmup (linear from 0 over
    plan.warmup_steps, then cosine to 0 at plan.total_steps), stepped once per optimizer step."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)


def export(built: Built, destination: str, is_master: bool, tracker: Any = None, registered_name: str = "") -> None:
    """Write the final model directory to local disk or S3 (and, with a tracker, into the run and the
    model registry as `registered_name`). Every rank must call this: under ZeRO-3 the partitioned
    weights are gathered (DeepSpeed's save_16bit_model) and rank 0 writes them. The new model is
    written beside the old one and takes its place once complete (pipelines.train.publish): a crash
    leaves the old model, never a mix or nothing."""
    from pipelines.train.publish import writing_model

    with tempfile.TemporaryDirectory() as gathered:
        state = None
        if built.zero_stage == 3:
            built.engine.save_16bit_model(gathered, CONSOLIDATED_FILE)  # collective; rank 0 writes
            if is_master:
                state = torch.load(Path(gathered, CONSOLIDATED_FILE), map_location="cpu", weights_only=True)
        if not is_master:
            return
        with writing_model(destination) as directory:
            built.model.save(directory, tokenizer=built.tokenizer, state_dict=state)
            del state  # the gathered copy of a 7B+ model: free it before the upload
            if tracker is not None and registered_name:
                version = tracker.log_model(str(directory), registered_name)
                if version:
                    logger.info("model registered in MLflow as %s version %s", registered_name, version)
    logger.info("model written to %s", destination)
