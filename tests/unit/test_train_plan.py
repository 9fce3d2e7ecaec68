"""Pure parts of training: step plan, schedule, DeepSpeed config, length grouping, recipes, and
the choice of checkpoint to resume from."""

import json

import math

import pytest

from pipelines.config import load_recipe, shipped_recipes
from pipelines.train import (COMPLETE_FILE, RAY_SNAPSHOT_FILE, WINDOW_MICRO_BATCHES, checkpoint_dir_name,
                             deepspeed_config, find_resume_point, plan_steps, warmup_cosine)
from pipelines.train_data import group_by_length, padding_share
from pipelines.config import TrainConfig


def test_global_batch_and_steps():
    cfg = TrainConfig(num_workers=8, micro_batch_size=16, grad_accum_steps=1, epochs=1)
    plan = plan_steps(665_298, cfg)
    assert plan.global_batch == 128
    # 665,298 // 8 = 83,162 rows a worker; windows of 128 rows = 8 micro-batches; 83,162 = 649*128 + 90
    assert plan.micro_batches_per_epoch == 649 * WINDOW_MICRO_BATCHES + math.ceil(90 / 16)
    assert plan.total_steps == 5198 and plan.warmup_steps == int(5198 * 0.03)
    assert plan_steps(100, TrainConfig(max_steps=7)).total_steps == 7
    accum = plan_steps(64, TrainConfig(num_workers=2, micro_batch_size=4, grad_accum_steps=2, epochs=2))
    assert accum.global_batch == 16 and accum.total_steps == 8


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(warmup_steps=3, total_steps=13)
    assert [round(f(s), 3) for s in range(3)] == [0.25, 0.5, 0.75]
    assert f(3) == 1.0 and abs(f(8) - 0.5) < 1e-9 and f(13) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(3, 13))


def test_deepspeed_config_fills_auto_fields():
    cfg = TrainConfig(num_workers=2, micro_batch_size=4, grad_accum_steps=3)
    zero2 = deepspeed_config("infra/deepspeed/zero2.json", cfg)
    assert zero2["zero_optimization"]["stage"] == 2
    assert (zero2["train_micro_batch_size_per_gpu"], zero2["gradient_accumulation_steps"], zero2["train_batch_size"]) == (4, 3, 24)
    assert zero2["bf16"]["enabled"] is False
    assert deepspeed_config("infra/deepspeed/zero3.json", TrainConfig(use_gpu=True))["bf16"]["enabled"] is True
    assert "auto" not in str(zero2)


def test_group_by_length_cuts_padding_and_keeps_every_row():
    rows = [{"id": str(i), "length": length} for i, length in enumerate([5, 300, 7, 280, 6, 310, 8, 290])]
    grouped = group_by_length(rows, micro_batch_size=2, seed=0)
    plain = group_by_length(rows, micro_batch_size=2, seed=0, enabled=False)
    assert sorted(r["id"] for c in grouped for r in c) == sorted(r["id"] for r in rows)
    assert padding_share(grouped) < 0.05 < padding_share(plain)
    assert group_by_length(rows, 2, seed=0) == grouped


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.paths.shards.endswith("/shards") and recipe.train.run_name
    deepspeed_config(recipe.train.deepspeed_config, recipe.train)


def test_llava_recipes_carry_the_published_hyperparameters():
    for name in ("llava-1.5-7b", "llava-1.5-13b"):
        train = load_recipe(name).train
        assert (train.lr, train.epochs, train.warmup_ratio, train.max_length) == (2e-5, 1.0, 0.03, 2048)
        assert train.micro_batch_size * train.grad_accum_steps * train.num_workers == 128
        assert deepspeed_config(train.deepspeed_config, train)["zero_optimization"]["stage"] == 3
        assert train.use_gpu


def test_overrides_are_typed_and_unknown_keys_named():
    recipe = load_recipe("tiny", ["train.lr=0.5", "train.use_gpu=yes", "paths.root=s3://b/r", "trim.preset=official"])
    assert recipe.train.lr == 0.5 and recipe.train.use_gpu is True
    assert recipe.paths.cache == "s3://b/r/cache" and recipe.paths.mixture.startswith("s3://b/r/data/")
    assert recipe.trim.iqr_scope == "batch"
    with pytest.raises(ValueError, match="unknown key 'lrr'"):
        load_recipe("tiny", ["train.lrr=1"])
    with pytest.raises(ValueError, match="not a int"):
        load_recipe("tiny", ["train.num_workers=two"])
    with pytest.raises(FileNotFoundError, match="shipped: "):
        load_recipe("nope")


def _checkpoint(run_dir, step, complete):
    directory = run_dir / checkpoint_dir_name(step)
    directory.mkdir(parents=True)
    (directory / "train_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (directory / COMPLETE_FILE).write_text(json.dumps({"step": step}))


def test_resume_point_is_the_newest_complete_checkpoint_registered_or_not(tmp_path):
    run_dir = tmp_path / "run"
    assert find_resume_point(str(run_dir)) is None  # a new run
    _checkpoint(run_dir, 4, complete=True)
    _checkpoint(run_dir, 8, complete=True)
    _checkpoint(run_dir, 12, complete=False)  # killed while uploading
    (run_dir / RAY_SNAPSHOT_FILE).write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": checkpoint_dir_name(4)}]}))
    said = []
    assert find_resume_point(str(run_dir), log=said.append) == str(run_dir / checkpoint_dir_name(8))
    # Ray Train's own checkpoint stays (it deletes those itself); the unfinished newer one is left to be
    # overwritten when the run gets there again.
    assert sorted(p.name for p in run_dir.glob("checkpoint_step_*")) == [checkpoint_dir_name(s) for s in (4, 8, 12)]
    assert said == []


def test_resume_point_removes_unregistered_checkpoints_it_passes_over(tmp_path):
    run_dir = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run_dir, step, complete=True)
    _checkpoint(run_dir, 2, complete=False)
    said = []
    assert find_resume_point(str(run_dir), log=said.append) == str(run_dir / checkpoint_dir_name(8))
    assert [p.name for p in run_dir.glob("checkpoint_step_*")] == [checkpoint_dir_name(8)]
    assert len(said) == 2 and all("never registered" in line for line in said)


def test_an_unreadable_ray_snapshot_keeps_every_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    for step in (4, 8):
        _checkpoint(run_dir, step, complete=True)
    (run_dir / RAY_SNAPSHOT_FILE).write_text("{not json")
    said = []
    assert find_resume_point(str(run_dir), log=said.append) == str(run_dir / checkpoint_dir_name(8))
    assert len(list(run_dir.glob("checkpoint_step_*"))) == 2
    assert len(said) == 1 and RAY_SNAPSHOT_FILE in said[0]


def test_a_checkpoint_that_cannot_be_loaded_is_named(tmp_path):
    from pipelines.train import _load

    class Engine:  # stands in for a DeepSpeed engine: the checkpoint files are what is under test
        def load_checkpoint(self, directory, tag):
            return directory, tag

    _checkpoint(tmp_path, 4, complete=True)
    directory = str(tmp_path / checkpoint_dir_name(4))
    assert _load(Engine(), directory, directory) == {"step": 4}
    (tmp_path / checkpoint_dir_name(4) / "train_state.json").write_text("{truncated")
    with pytest.raises(RuntimeError, match=f"cannot resume from checkpoint {directory}.*Delete that folder"):
        _load(Engine(), directory, directory)
