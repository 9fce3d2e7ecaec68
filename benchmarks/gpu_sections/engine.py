"""The training engine as the workers run it, without Ray: `pipelines.train.worker.train_loop` in this
process (world size 1; NCCL on CUDA, gloo on the CPU), with the worker's surroundings from
`pipelines.train.context.LocalContext` instead of Ray Train. So the model and the DeepSpeed engine are
built by `pipelines.train.engine.build` (ZeRO-3 from infra/deepspeed/zero3.json, bf16 on CUDA,
zero.Init and the streamed ZeRO-3 load), trained by `worker.fit` on packed micro-batches read from the
cache, checkpointed by `pipelines.train.checkpoints` and exported in 16 bits by `engine.export`.

The cache holds one micro-batch of image samples, so every step trains on the same batch (its loss
must fall). Full and TRIM runs train `STEPS` steps each (the full run checkpoints at its end only, the
TRIM run at `STEPS // 2` too: a ZeRO-3 checkpoint of ~1B parameters is ~15 GB); then the TRIM run's
last checkpoint and export are removed and the run is started again: it resumes at the middle
checkpoint, and its next losses must be the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import shutil
import socket
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from gpu_sections.engine_cache import write_caches, write_llm
from gpu_sections.run import Run
from trim.model_files import SETTINGS_FILE

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
"""Optimizer steps of each run (one micro-batch each)."""
WARMUP_STEPS = 2
"""Steps left out of the step time (first allocations, kernel choices)."""


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A process group of this process alone, as Ray Train's TorchConfig sets one up for a worker (its
    environment variables too, which DeepSpeed reads); the variables are restored after."""
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def recipe_for(run: Run, root: Path, llm: str, name: str, micro: int):
    """The run's recipe: the 7B recipe's training settings (ZeRO-3, packing, its attention, gradient
    checkpointing on CUDA) at this check's size; the tiny recipe's TRIM and learning rate with --tiny."""
    import dataclasses

    from pipelines.config import load_recipe

    base = load_recipe("tiny" if run.tiny else "llava-1.5-7b")
    cuda = run.device.type == "cuda"
    train = dataclasses.replace(
        base.train, run_name=f"engine-{name}", num_workers=1, use_gpu=cuda,
        deepspeed_config=str(REPO / "infra" / "deepspeed" / "zero3.json"), micro_batch_size=micro,
        grad_accum_steps=1, lr=base.train.lr if run.tiny else 1e-4, max_steps=STEPS,
        checkpoint_every=STEPS if name == "full" else STEPS // 2,
        max_length=1024 if run.tiny else 2048, gradient_checkpointing=cuda, packing=True, preload=True,
        attn_implementation=base.train.attn_implementation if cuda else "sdpa_packed", max_failures=0)
    paths = dataclasses.replace(base.paths, root=str(root), llm=llm, projector="", clip="").resolved()
    return dataclasses.replace(base, name=f"gpu-check-{name}", paths=paths, train=train)


def peak_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset; on the CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(run: Run, recipe, cache: str):
    """One run of the worker's own loop on `cache`; returns (job, its context, the steps' metrics)."""
    from pipelines.train.context import LocalContext
    from pipelines.train.data import sample_index
    from pipelines.train.launch import train_job
    from pipelines.train.worker import SAMPLE_INDEX_KEY, train_loop

    job = train_job(recipe, tracking_uri="", cache=cache)
    context = LocalContext(job.run_dir)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_loop({**job.to_dict(), SAMPLE_INDEX_KEY: sample_index(cache)}, context)
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    steps = dict(context.trackers[-1].steps)
    return job, context, steps


def cache_tokens(job, cache: str) -> tuple[int, list[dict]]:
    """The real (spliced) tokens of the cache's samples as the worker tokenizes them, and its rows."""
    from pipelines.train.data import CacheReader, sample_index
    from trim.formats import tokenizer_path

    index = sample_index(cache)
    rows = list(CacheReader(index, tokenizer_path(job.llm), job.train.max_length).read(range(len(index))).values())
    return sum(r["length"] for r in rows), rows


def export_loss(run: Run, job, rows: list[dict]) -> float:
    """The exported model, loaded back as evaluation loads it, on the micro-batch it was trained on."""
    from pipelines.train.data import collate
    from trim.formats import load_llava_trim
    from trim.llm_tokenizer import load_llm_tokenizer

    model = load_llava_trim(job.export_dir, job.feature_dim, dtype=run.dtype).to(run.device).eval()
    tokenizer = load_llm_tokenizer(str(Path(job.export_dir) / "llm"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        loss = float(model(collate(rows, pad, packing=True, max_length=job.train.max_length)))
    del model
    return loss


def engine_section(run: Run) -> None:
    micro = run.sizes.micro
    root = Path(tempfile.mkdtemp(prefix="gpu-check-engine-"))
    try:
        from synthetic.tiny_models import shipped_clip

        llm = write_llm(run, root / "llm", run.engine_layers)
        base = recipe_for(run, root, llm, "trim", micro)
        caches = write_caches(run, root, str(shipped_clip()), micro, base.trim)
        tokens, losses, step_s = {}, {}, {}
        with process_group(run.device):
            for name in ("full", "trim"):
                recipe = recipe_for(run, root, llm, name, micro)
                job, context, steps = train(run, recipe, caches[name])
                tokens[name], rows = cache_tokens(job, caches[name])
                losses[name] = [steps[s]["loss"] for s in sorted(steps)]
                step_s[name] = statistics.median(steps[s]["step_time_s"] for s in sorted(steps)[WARMUP_STEPS:])
                run.put(**{f"engine_step_{name}_s": step_s[name], f"engine_peak_gib_{name}": peak_gib(run.device),
                           f"engine_tokens_{name}": tokens[name], f"engine_loss_first_{name}": losses[name][0],
                           f"engine_loss_last_{name}": losses[name][-1],
                           f"engine_padding_share_{name}": steps[STEPS]["padding_share"],
                           f"engine_checkpoints_{name}": [n for n, _ in context.reports]})
                if name == "full":
                    shutil.rmtree(job.run_dir)  # disk: only the TRIM run's checkpoints are needed
            size = sum(f.stat().st_size for f in Path(job.export_dir).rglob("*") if f.is_file())
            run.put(engine_export_gib=size / 2**30, engine_export_loss_trim=export_loss(run, job, rows))
            # Interrupt the TRIM run after its middle checkpoint: remove what came after, start again.
            shutil.rmtree(Path(job.run_dir) / f"checkpoint_step_{STEPS:08d}")
            shutil.rmtree(job.export_dir)
            _, resumed_context, resumed = train(run, recipe, caches["trim"])
        middle = STEPS // 2
        uninterrupted = losses["trim"][middle:]
        again = [resumed[s]["loss"] for s in sorted(resumed)]
        run.put(engine_resumed_steps=sorted(resumed), engine_resume_next_loss=again[0],
                engine_uninterrupted_next_loss=uninterrupted[0],
                engine_resume_next_loss_equal=again[0] == uninterrupted[0],
                engine_resume_max_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(again, uninterrupted)),
                engine_resume_exported=(Path(job.export_dir) / SETTINGS_FILE).exists())
        finite = all(math.isfinite(v) for v in losses["full"] + losses["trim"] + again)
        run.put(engine_step_ratio=step_s["full"] / step_s["trim"], engine_token_ratio=tokens["full"] / tokens["trim"],
                engine_losses_finite=finite,
                engine_loss_decreasing=all(losses[n][-1] < losses[n][0] for n in ("full", "trim")),
                engine_export_learned=run.results["engine_export_loss_trim"] < losses["trim"][0],
                engine_layers=run.engine_layers, engine_micro_batch=micro, engine_steps=STEPS)
    finally:
        shutil.rmtree(root, ignore_errors=True)
