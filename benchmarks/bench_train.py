"""Training step time fed all 576 visual tokens / fed the TRIM cache: same samples, same batch, through
the real Ray Train + DeepSpeed (ZeRO-2, 2 CPU workers) fine-tune job, in one run; and what the pipeline
costs over DeepSpeed alone at the same world size.

- `step_ratio`: the job's median step time full / TRIM; `token_ratio`: mean sequence length full / TRIM
  (`step_over_token_ratio` >= 0.9); `padding_share`: padding in TRIM's packed micro-batches (<= 0.05).
- `pipeline_over_deepspeed`: the baseline's median step / the job's median step, TRIM, as the median
  over --repeats pairs of runs, a job then its baseline (`_repeats`: each pair's ratio; on a quiet
  machine the baseline's 40-step median moved between 47 and 69 ms from run to run, the job's between
  61 and 68, so one pair decides nothing); `_full` beside it, one pair.
  The baseline is the same model, batches and DeepSpeed config built by the job's own code
  (pipelines.train.launch.train_job, pipelines.train.engine.build) in two plain torch.distributed
  processes (gloo, 127.0.0.1) on tensors collated beforehand: no Ray, no loader, no MLflow, no
  checkpoints. What is left between the two is the pipeline's own cost; target >= 0.9.
- `bare_ratio` (information): full / TRIM of a bare forward+backward+AdamW in one process, no
  data-parallel synchronisation at all.
- `loader_over_preloaded_trim` (full size only): step time reading the cache as it trains / with
  every sample preloaded into the workers (train.preload).

    python benchmarks/bench_train.py [--samples 512] [--steps 40] [--micro 8] [--repeats 3] [--quick]
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import torch.multiprocessing as mp
from common import REPO, run_measured, table

from pipelines.cache_format import decode_tokens, iter_cache
from pipelines.config import load_recipe
from pipelines.manifests import CacheManifest, resolve_output
from trim.batching import pack_batch
from trim.conversation import tokenize_conversation
from trim.formats import load_llava_trim

SKIP = 3
"""Warm-up steps left out of every median."""


def job(name, root, *overrides):
    args = [sys.executable, str(REPO / "jobs" / f"{name}.py"), "--recipe", "tiny", "--set", f"paths.root={root}"]
    for o in overrides:
        args += ["--set", o]
    return run_measured(args)


def prepare(work: Path, model_sets: list[str]) -> None:
    """Shard and precompute both roots (trim, full) in one child process with one local Ray: the data
    is what the jobs measured here train on, not itself measured. Each stage skips what its current
    version already holds."""
    from pipelines.logs import setup_logging
    from pipelines.precompute.stage import run_precompute
    from pipelines.ray_cluster import init_ray
    from pipelines.shard.stage import run_shard

    setup_logging()
    init_ray()
    for kind in ("trim", "full"):
        sets = [f"paths.root={work / kind}", *model_sets, *(["trim.selection=all"] if kind == "full" else [])]
        recipe = load_recipe("tiny", sets)
        paths = recipe.paths
        run_shard(paths.mixture, paths.image_root, paths.shards, recipe.shard)
        run_precompute(paths.shards, paths.cache, paths.clip, recipe.trim, recipe.precompute)


def metric_history(root: Path, run_name: str, metric: str):
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == run_name]
    return client.get_metric_history(runs[0].info.run_id, metric)


def visual_per_sample(root: Path, run_name: str) -> float:
    return max(m.value for m in metric_history(root, run_name, "visual_tokens_per_sample"))


def median_step_time(root: Path, run_name: str, skip: int = SKIP) -> float:
    """Median step_time_s after `skip` warm-up steps (a step's time leaves out checkpoint saving)."""
    history = metric_history(root, run_name, "step_time_s")
    return statistics.median(m.value for m in history if m.step > skip)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _baseline_rank(rank: int, world: int, port: int, jobs: list[tuple[dict, str]], steps: int, out: str) -> None:
    """One rank of the DeepSpeed baseline, for each (job, cache version folder) in turn: the job's
    engine, this rank's micro-batches of the job's order read and collated before the clock starts,
    then forward, backward and step only."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as a Ray Train worker sets them
    deepspeed.init_distributed(dist_backend="gloo")
    times = [_baseline_steps(rank, world, job_dict, cache, steps) for job_dict, cache in jobs]
    Path(out, f"rank{rank}.json").write_text(json.dumps(times))


def _baseline_steps(rank: int, world: int, job_dict: dict, cache: str, steps: int) -> list[float]:
    from pipelines.train.data import CacheReader, collate, sample_index
    from pipelines.train.engine import build
    from pipelines.train.order import epoch_micro_batches, rank_micro_batches
    from pipelines.train.plan import TrainJob
    from trim.formats import tokenizer_path

    job = TrainJob.from_dict(job_dict)
    cfg = job.train
    torch.manual_seed(cfg.seed)
    built = build(job)
    index = sample_index(cache)
    rows = CacheReader(index, tokenizer_path(job.llm), cfg.max_length).read(range(len(index)))
    tokenizer = built.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches, epoch = [], 0
    while len(batches) < steps * cfg.grad_accum_steps:
        everyone = epoch_micro_batches(index.length, index.is_image, cfg.micro_batch_size, world,
                                       cfg.grad_accum_steps, cfg.seed, epoch, cfg.group_by_length, cfg.packing)
        for chunk in rank_micro_batches(everyone, rank, world):
            samples = [rows[k] for k in chunk if k in rows]
            if samples:
                batches.append(collate(samples, pad_id, cfg.packing, cfg.max_length))
        epoch += 1
    engine = built.engine
    engine.train()
    times, started = [], time.perf_counter()
    for batch in batches[:steps * cfg.grad_accum_steps]:
        boundary = engine.is_gradient_accumulation_boundary()
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        loss.item()
        if boundary:
            now = time.perf_counter()
            times.append(now - started)
            started = now
    engine.destroy()
    return times


def deepspeed_steps(roots: dict[str, Path], overrides: list[str], steps: int) -> dict[str, float]:
    """Median step time (rank 0, after SKIP warm-up steps) of the DeepSpeed baseline on each root's
    cache, one root after the other in the same two processes."""
    from pipelines.train.launch import train_job

    jobs = []
    for root in roots.values():
        recipe = load_recipe("tiny", [f"paths.root={root}", *overrides])
        cache = resolve_output(recipe.paths.cache)  # the version the job trains on
        jobs.append((train_job(recipe, "", cache).to_dict(), cache))
    world = load_recipe("tiny", overrides).train.num_workers
    # The environment Ray gives the job's workers (huge pages for large CPU tensors; one OpenMP thread
    # per CPU the worker asks for): spawned processes inherit it, torch reads it at its first allocation.
    from pipelines.ray_cluster import worker_env

    saved = dict(os.environ)
    os.environ.update({**worker_env(os.environ), "OMP_NUM_THREADS": "1"})
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_baseline_rank, args=(world, _free_port(), jobs, steps, out), nprocs=world, join=True,
                           start_method="spawn")
        times = json.loads(Path(out, "rank0.json").read_text())
    os.environ.clear()
    os.environ.update(saved)
    return {kind: statistics.median(kind_times[SKIP:]) for kind, kind_times in zip(roots, times)}


def bare_ratio(root: Path, llm: Path, micro: int, threads: int, batches: int = 8,
               repeats: int = 7) -> tuple[float, float, float]:
    """Mean forward+backward+AdamW step over `batches` micro-batches of the same samples (in id
    order), full vs TRIM tokens, one process on `threads` torch threads (as many as each training
    worker has), tensors already in memory, the recipe's attention. The two alternate pass by pass
    (the machine's drift hits both alike). Returns (ratio of the median passes, mean sequence length
    full, mean sequence length TRIM)."""
    from trim.llm_tokenizer import load_llm_tokenizer

    # The ratio depends on the threads (the TRIM step's small matrices gain little from a second one).
    torch.set_num_threads(threads)
    tokenizer = load_llm_tokenizer(llm)
    attn = load_recipe("tiny").train.attn_implementation
    setups, lengths = {}, {}
    for kind in ("full", "trim"):
        rows = sorted((r for r in iter_cache(str(root / kind / "cache")) if r["num_tokens"]), key=lambda r: r["index"])
        samples = []
        for r in rows[: micro * batches]:
            tok = tokenize_conversation(json.loads(r["conversations"]), tokenizer, 2048, r["num_tokens"])
            samples.append({"input_ids": tok.input_ids, "labels": tok.labels, "visual": decode_tokens(r)})
        # Collated as the training loop does (packed rows of up to max_length), so the ratio compares like with like.
        packed = [pack_batch(samples[i:i + micro], 1024, tokenizer.pad_token_id) for i in range(0, len(samples), micro)]
        model = load_llava_trim(llm, feature_dim=samples[0]["visual"].shape[1], attn_implementation=attn)
        setups[kind] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), packed)
        lengths[kind] = statistics.mean(len(s["input_ids"]) - 1 + s["visual"].shape[0] for s in samples)
    times: dict[str, list[float]] = {"full": [], "trim": []}
    for repeat in range(repeats + 1):
        for kind, (model, optimizer, packed) in setups.items():
            started = time.perf_counter()
            for batch in packed:
                model(batch).backward()
                optimizer.step()
                optimizer.zero_grad()
            if repeat:  # the first pass warms up
                times[kind].append((time.perf_counter() - started) / len(packed))
    return statistics.median(times["full"]) / statistics.median(times["trim"]), lengths["full"], lengths["trim"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3,
                        help="pairs of TRIM runs (the job, then DeepSpeed alone) behind pipeline_over_deepspeed")
    parser.add_argument("--workdir", default="/tmp/bench-train")
    parser.add_argument("--quick", action="store_true",
                        help="64 samples, 8 steps, micro-batch 4, no preloaded job runs, one pair, a short bare pass")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.steps, args.micro, args.repeats = 64, 8, 4, 1
    from synthetic.tiny_models import build_tiny_models

    work = Path(args.workdir)
    models = build_tiny_models(work / "models")
    model_sets = [f"paths.clip={models.clip}", f"paths.llm={models.llm}"]
    if args.prepare:
        return prepare(work, model_sets)
    from synthetic.mixture import write_mixture

    for kind in ("trim", "full"):
        if not (work / kind / "data").exists():
            write_mixture(work / kind / "data", args.samples, args.samples // 2, seed=2)
    run_measured([sys.executable, __file__, "--prepare", "--workdir", str(work)])

    common = [*model_sets, f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro}",
              "train.checkpoint_every=10", f"train.deepspeed_config={REPO / 'infra' / 'deepspeed' / 'zero2.json'}",
              "train.max_length=1024"]  # room for all 576 visual tokens plus the text
    results, runs = {}, {}
    for kind in ("full", "trim"):
        for preload in (False,) if args.quick else (False, True):
            run_name = f"{kind}-{'preload' if preload else 'loader'}-{int(time.time())}"
            job("finetune", work / kind, *common, f"train.run_name={run_name}", f"train.preload={preload}")
            results[(kind, preload)] = median_step_time(work / kind, run_name)
            runs[(kind, preload)] = run_name
    baseline = deepspeed_steps({kind: work / kind for kind in ("full", "trim")}, common, args.steps)
    # More TRIM pairs, each job beside its own baseline: a pair's ratio moves with the machine's moment.
    ratios = [baseline["trim"] / results[("trim", False)]]
    for _ in range(args.repeats - 1):
        run_name = f"trim-loader-{int(time.time())}"
        job("finetune", work / "trim", *common, f"train.run_name={run_name}", "train.preload=False")
        alone = deepspeed_steps({"trim": work / "trim"}, common, args.steps)["trim"]
        ratios.append(alone / median_step_time(work / "trim", run_name))
    manifest = CacheManifest.read(str(work / "trim" / "cache"))
    threads = max(1, (os.cpu_count() or 1) // load_recipe("tiny").train.num_workers)  # as a training worker sets them
    bare, full_len, trim_len = bare_ratio(work, models.llm, args.micro, threads, *((2, 2) if args.quick else ()))
    pipeline = results[("full", False)] / results[("trim", False)]
    rows = [[f"{k} pipeline, {'preloaded' if p else 'read from the cache'}", v * 1000] for (k, p), v in results.items()]
    rows += [[f"{k} DeepSpeed alone, preloaded tensors", v * 1000] for k, v in baseline.items()]
    print(table(rows, [f"step (2 workers, ZeRO-2, micro-batch {args.micro})", "median ms"]))
    for kind in ("full", "trim"):  # the full runs must really have seen 576 tokens an image
        assert visual_per_sample(work / kind, runs[(kind, False)]) > (400 if kind == "full" else 0), kind
    over = {"trim": statistics.median(ratios), "full": baseline["full"] / results[("full", False)]}
    token_ratio = full_len / trim_len
    padding = statistics.median(m.value for m in metric_history(work / "trim", runs[("trim", False)], "padding_share"))
    print(f"visual tokens per image: full 576, TRIM mean {manifest.kept.mean_tokens:.1f}; "
          f"mean sequence {full_len:.0f} vs {trim_len:.0f} tokens")
    print(f"step time full / TRIM through Ray Train + DeepSpeed: {pipeline:.2f}x; over the token ratio "
          f"{pipeline / token_ratio:.2f} (target >= 0.9)")
    print(f"DeepSpeed alone / pipeline step time: TRIM {over['trim']:.3f} (median of "
          f"{', '.join(f'{r:.3f}' for r in ratios)}; target >= 0.9), full {over['full']:.3f}")
    print(f"bare forward+backward+step full / TRIM (one process, no data parallelism): {bare:.2f}x")
    print(f"padding share of the TRIM micro-batches (packed): {padding:.3f} (target <= 0.05)")
    result = {"step_ratio": round(pipeline, 3), "token_ratio": round(token_ratio, 3),
              "step_over_token_ratio": round(pipeline / token_ratio, 3), "padding_share": round(padding, 4),
              "pipeline_over_deepspeed": round(over["trim"], 3),
              "pipeline_over_deepspeed_repeats": [round(r, 3) for r in ratios],
              "pipeline_over_deepspeed_full": round(over["full"], 3),
              "deepspeed_ratio": round(baseline["full"] / baseline["trim"], 3), "bare_ratio": round(bare, 3),
              "pipeline_step_ms_trim": round(results[("trim", False)] * 1000, 2),
              "deepspeed_step_ms_trim": round(baseline["trim"] * 1000, 2)}
    if not args.quick:
        loader = results[("trim", False)] / results[("trim", True)]
        print(f"loader / preloaded step time, TRIM: {loader:.3f}, full: "
              f"{results[('full', False)] / results[('full', True)]:.3f} (target <= 1.1)")
        result["loader_over_preloaded_trim"] = round(loader, 3)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
