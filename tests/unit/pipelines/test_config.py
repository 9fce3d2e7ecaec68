"""Recipes: every shipped recipe loads, overrides are typed, path helpers."""

import pytest

from pipelines.config import load_recipe, shipped_recipes
from pipelines.train.engine import deepspeed_config


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


def test_run_and_model_directories_come_from_the_paths_config():
    paths = load_recipe("tiny", ["paths.root=s3://b/r"]).paths
    assert paths.run_dir("x") == "s3://b/r/checkpoints/x"
    assert paths.model_dir("x") == "s3://b/r/checkpoints/x/model"


def test_help_lists_every_section_and_field_with_its_docstring(capsys):
    import dataclasses

    from pipelines.cli import field_docs, recipe_argparser
    from pipelines.config import Recipe

    with pytest.raises(SystemExit) as done:
        recipe_argparser("A job.").parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for section in dataclasses.fields(Recipe):
        if section.name != "name":
            assert f"[{section.name}]" in text
            for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
                assert f"  {f.name} = " in text
    assert "  lr = 0.001  (float)\n      Peak learning rate." in text
    assert "  similarity = \"dot\"  (dot | cosine)" in text and "plain dot product of unnormalised CLIP" in text
    assert "--print-config" in text and "--set SECTION.KEY=VALUE" in text
    assert field_docs(Recipe)["train"] == "Fine-tune stage."


def test_print_config_prints_the_resolved_recipe_and_exits(capsys, tmp_path):
    import json

    from pipelines.cli import recipe_argparser

    argv = ["--recipe", "tiny", "--set", "train.lr=0.5", "--set", "trim.preset=official", "--print-config"]
    with pytest.raises(SystemExit) as done:
        recipe_argparser("A job.").parse_args(argv)
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "[train]\n" in printed and "lr = 0.5\n" in printed and 'iqr_scope = "batch"\n' in printed
    (tmp_path / "printed.toml").write_text(printed)
    expected = load_recipe("tiny", ["train.lr=0.5", "trim.preset=official"])
    assert load_recipe(str(tmp_path / "printed.toml")) == expected  # the TOML is a recipe that loads back the same
    with pytest.raises(SystemExit):
        recipe_argparser("A job.").parse_args([*argv, "json"])
    assert json.loads(capsys.readouterr().out) == expected.to_dict()
    args = recipe_argparser("A job.").parse_args(["--set", "train.lr=0.5"])
    assert args.overrides == ["train.lr=0.5"] and args.print_config is None
