"""The scheduled retraining end to end: the job sequence the CronJob's RayJob template runs (the
RayCronJob carries the same spec; tests/infra keeps the two equal), read from its entrypoint and run
as its commands are, one `python jobs/<stage>.py` process after the other, on the tiny recipe. A run,
a change of the mixture, the same run again: the second trains a new run on the new data by itself,
and the first run's versions stay by the retention rule (tests/unit/pipelines/train/test_runs.py
covers what the rule removes, and a rerun on an unchanged cache that trains nothing)."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import storage
from pipelines.manifests import CacheManifest, EvalManifest, ShardsManifest, read_current, resolve_output
from pipelines.train.run_names import CACHE_VERSION
from tests.infra import k8s_entrypoints as ep
from tests.infra import k8s_support as ks
from tests.integration.conftest import model_overrides, run_job

SIZING = {"paths.root", "precompute.concurrency", "precompute.num_gpus_per_actor", "train.num_workers"}
"""The entrypoint's overrides that place and size the deployment; the tiny run sets its own."""
KEPT = {"train.run_name", "precompute.keep_versions", "shard.keep_versions"}
"""The entrypoint's overrides that say what a run does and keeps: passed on as they are."""
TINY = {
    "shard": ["shard.concurrency=1"],
    "precompute": ["precompute.batch_size=8"],
    "finetune": ["train.num_workers=1", "train.max_steps=2", "train.micro_batch_size=2", "train.checkpoint_every=2"],
    "evaluate": [],
}
"""What keeps each stage short here (the same for every run, as a schedule's settings are)."""


def scheduled_sequence() -> list[tuple[str, list[str]]]:
    """(stage, overrides) of each command of the retraining entrypoint, the sizing left out."""
    sequence = []
    for job, _, overrides in ep.job_commands(ks.load("schedule/cronjob/retrain-template.yaml")):
        assert set(overrides) <= SIZING | KEPT, f"{job}: an override this test does not know"
        sequence.append((Path(job).stem, [f"{k}={v}" for k, v in overrides.items() if k not in SIZING]))
    return sequence


def run_schedule(root: Path, tiny_models) -> dict[str, str]:
    """One scheduled run, every stage in its own process as the RayJob runs them; their logs by stage."""
    logs = {}
    for stage, overrides in scheduled_sequence():
        result = run_job(stage, *model_overrides(root, tiny_models), *overrides, *TINY[stage])
        logs[stage] = result.stdout + result.stderr
    return logs


def test_a_scheduled_run_after_the_mixture_changed_trains_on_the_new_data_and_keeps_the_old(tmp_path, tiny_models):
    from synthetic.mixture import write_eval_split, write_mixture

    root = tmp_path / "run"
    mixture = write_mixture(root / "data", num_samples=16, num_images=4, seed=7)
    write_eval_split(root / "data" / "eval", num_questions=2)
    records = json.loads(mixture.read_text())
    assert len(records) > 10
    (stage, overrides), = [s for s in scheduled_sequence() if s[0] == "finetune"]
    template = dict(o.split("=", 1) for o in overrides)["train.run_name"]
    assert template.endswith(f"-{CACHE_VERSION}")

    run_schedule(root, tiny_models)
    first_shards, first_cache = ShardsManifest.read(str(root / "shards")), CacheManifest.read(str(root / "cache"))
    first_run = template.replace(CACHE_VERSION, first_cache.version)
    assert first_shards.samples == first_cache.samples == len(records)

    mixture.write_text(json.dumps(records[:10]))  # the data changed; nothing else is done by hand
    logs = run_schedule(root, tiny_models)
    shards, cache = ShardsManifest.read(str(root / "shards")), CacheManifest.read(str(root / "cache"))
    run = template.replace(CACHE_VERSION, cache.version)
    # Sharded and cached anew, exactly the new mixture.
    assert shards.version != first_shards.version and cache.version != first_cache.version
    assert shards.samples == cache.samples == 10 and cache.identity["shards"]["version"] == shards.version
    # A new run, trained on the new cache from step 0 (not refused, not resumed from the first).
    assert run != first_run and "resuming from" not in logs["finetune"]
    state = storage.read_json(str(root / "checkpoints" / run / "checkpoint_step_00000002" / "complete.json"))
    assert state["step"] == 2 and state["identity"]["cache"]["version"] == cache.version
    assert state["identity"]["cache"]["samples"] == 10
    model = json.loads((root / "checkpoints" / run / "model" / "trim_llava.json").read_text())
    assert model["trim"] == cache.trim
    # Evaluated: the new run's model answered.
    (answers,) = [p for p in (root / "eval").iterdir() if p.name.startswith(f"{run}-")]
    assert EvalManifest.read(str(answers)).identity["model_id"] == run
    # Retention (keep_versions = 2): the first run's shards, cache and run stay, complete.
    assert read_current(str(root / "cache"))["history"] == [cache.version, first_cache.version]
    assert ShardsManifest.read(str(root / "shards" / first_shards.version)).samples == len(records)
    assert CacheManifest.read(str(root / "cache" / first_cache.version)).samples == len(records)
    assert (root / "checkpoints" / first_run / "model" / "trim_llava.json").exists()
    assert resolve_output(str(root / "cache")) == str(root / "cache" / cache.version)

