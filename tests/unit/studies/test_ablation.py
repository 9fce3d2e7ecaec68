import dataclasses
import json
import random

import pytest

from studies.ablation import KINDS, AblationConfig, RowData, Sample, ask, chance, make_split, variants
from studies.ablation_seeds import model_seeds, record_key, record_path, result_figures, run_rows, summarise, table
from trim.config import TrimConfig


def test_questions_have_the_scenes_answers():
    scenes, samples = make_split(200, seed=4)
    assert {s.kind for s in samples} == set(KINDS)
    for sample in samples:
        scene = scenes[sample.scene]
        if sample.kind == "count":
            assert sample.answer == str(len(scene.objects))
        elif sample.kind == "colour":
            shape = sample.question.rstrip("?").split()[-1]
            assert [o.colour for o in scene.with_shape(shape)] == [sample.answer]
        else:
            colour, shape = sample.question.rstrip("?").split()[-2:]
            assert any(o.position == sample.answer and o.colour == colour for o in scene.with_shape(shape))


def test_chance_is_the_most_common_answer_per_kind():
    samples = [Sample(0, "colour", "q", "red"), Sample(0, "colour", "q", "red"), Sample(0, "colour", "q", "blue"),
               Sample(0, "count", "q", "1")]
    assert chance(samples) == 3 / 4


def test_rows_share_trims_counts_and_flip_only_the_sign():
    rows = variants(TrimConfig())
    assert set(rows) == {"full", "trim", "trim_no_aggregate", "uniform", "random", "trim_other_sign"}
    assert rows["full"].selection == "all" and rows["uniform"].selection == "pool"
    assert rows["trim_no_aggregate"].aggregate is False
    assert rows["trim"].keep != rows["trim_other_sign"].keep


def test_the_same_seed_asks_the_same_questions():
    scenes = make_split(5, seed=1)[0]
    first = [ask(s, i, random.Random(i)) for i, s in enumerate(scenes)]
    assert first == [ask(s, i, random.Random(i)) for i, s in enumerate(scenes)]


def test_kinds_keep_their_shares_and_chance_stays_low():
    samples = make_split(1000, seed=2)[1]
    shares = {kind: sum(s.kind == kind for s in samples) / len(samples) for kind in KINDS}
    for kind, share in KINDS.items():
        assert abs(shares[kind] - share) < 0.05, shares
    assert chance(samples) <= 0.2


def test_a_scene_with_no_unique_shape_is_asked_only_to_count():
    scene = next(s for s in make_split(300, seed=3)[0] if len({o.shape for o in s.objects}) == 1
                 and len(s.objects) > 1)
    asked = [ask(scene, 0, random.Random(i)) for i in range(30)]
    assert {a.kind for a in asked if a is not None} == {"count"}
    assert None in asked


def _seed(row, seed, accuracy, colour, position, count):
    return {"row": row, "seed": seed, "accuracy": accuracy, "accuracy_colour": colour,
            "accuracy_position": position, "accuracy_count": count, "mean_visual_tokens": 46.0,
            "step_seconds": 0.2, "loss_curve": [[50, 1.0]]}


def test_a_rows_seeds_give_its_mean_and_sample_spread_overall_and_per_kind():
    row = summarise("trim", [_seed("trim", 0, 0.40, 0.6, 0.1, 0.7), _seed("trim", 1, 0.44, 0.7, 0.2, 0.6),
                             _seed("trim", 2, 0.42, 0.8, 0.15, 0.5)])
    assert row["seeds"] == [0, 1, 2]
    assert row["accuracy"] == pytest.approx(0.42) and row["accuracy_std"] == pytest.approx(0.02)
    assert row["accuracy_colour"] == pytest.approx(0.7) and row["accuracy_colour_std"] == pytest.approx(0.1)
    assert row["accuracy_position"] == pytest.approx(0.15) and row["accuracy_position_std"] == pytest.approx(0.05)
    assert row["accuracy_count"] == pytest.approx(0.6) and row["accuracy_count_std"] == pytest.approx(0.1)
    assert [s["seed"] for s in row["per_seed"]] == [0, 1, 2]


def test_one_seed_has_no_spread_and_no_seed_is_refused():
    row = summarise("full", [_seed("full", 0, 0.5, 0.5, 0.5, 0.5)])
    assert row["accuracy"] == 0.5 and row["accuracy_std"] == 0.0
    with pytest.raises(ValueError, match="full"):
        summarise("full", [])


def test_the_result_holds_each_rows_mean_its_std_and_the_seed_count():
    cfg = AblationConfig(seeds=2)
    rows = [summarise(name, [_seed(name, 0, 0.3, 0, 0, 0), _seed(name, 1, 0.5, 0, 0, 0)]) for name in ("full", "trim")]
    result = result_figures(rows, cfg)
    assert result["seeds"] == 2
    for name in ("full", "trim"):
        assert result[f"accuracy_{name}"] == pytest.approx(0.4)
        assert result[f"accuracy_{name}_std"] == pytest.approx(0.1414, abs=1e-4)
    lines = table(rows, 0.167).splitlines()
    assert lines[2].startswith("| full | 0.400 ± 0.141 |") and lines[-1].startswith("| chance")


def test_model_seeds_count_up_from_the_first():
    assert model_seeds(AblationConfig(seed=5, seeds=3)) == [5, 6, 7]
    with pytest.raises(ValueError, match="seeds"):
        model_seeds(AblationConfig(seeds=0))


def test_a_finished_seed_is_read_back_and_a_changed_config_is_run_again(tmp_path):
    cfg = AblationConfig(seeds=2, steps=10)
    row = RowData("trim", TrimConfig.paper(), train=[], held_out=[], kinds=[], mean_visual_tokens=46.0)
    for seed, accuracy in ((0, 0.4), (1, 0.5)):
        key = record_key(cfg, row, seed, "clip-hash")
        # seed 0 under the name records had before they were keyed, seed 1 under record_path's
        path = tmp_path / "trim-seed0.json" if seed == 0 else record_path(tmp_path, "trim", seed, key)
        path.write_text(json.dumps({"key": key, "result": _seed("trim", seed, accuracy, 0, 0, 0)}))

    def no_training(seed):
        raise AssertionError(f"seed {seed} trained again")

    assert run_rows([row], cfg, no_training, tmp_path, "clip-hash")[0]["accuracy"] == pytest.approx(0.45)
    for changed, clip in ((dataclasses.replace(cfg, steps=20), "clip-hash"), (cfg, "another-clip")):
        with pytest.raises(AssertionError, match="seed 0 trained again"):
            run_rows([row], changed, no_training, tmp_path, clip)


def test_runs_of_other_settings_keep_their_own_records(tmp_path):
    """A 1000-step run beside a 300-step one: each reads back its own seeds, neither replaces the other's."""
    row = RowData("trim", TrimConfig.paper(), train=[], held_out=[], kinds=[], mean_visual_tokens=46.0)
    short, long = AblationConfig(steps=300), AblationConfig(steps=1000)
    trained = []

    def train(accuracy):
        def run(r, llm, cfg, seed):
            trained.append(cfg.steps)
            return _seed("trim", seed, accuracy, 0, 0, 0)
        return run

    import studies.ablation_seeds as ablation_seeds

    for cfg, accuracy in ((short, 0.4), (long, 0.6)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ablation_seeds, "run_seed", train(accuracy))
            run_rows([row], cfg, lambda seed: tmp_path, tmp_path, "clip-hash")
    assert trained == [300, 1000]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ablation_seeds, "run_seed", train(0.0))
        assert run_rows([row], short, lambda seed: tmp_path, tmp_path, "clip-hash")[0]["accuracy"] == 0.4
        assert run_rows([row], long, lambda seed: tmp_path, tmp_path, "clip-hash")[0]["accuracy"] == 0.6
    assert trained == [300, 1000]  # both read back, none trained again
    assert len(list(tmp_path.glob("trim-seed0-*.json"))) == 2
