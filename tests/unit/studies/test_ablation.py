import random

from studies.ablation import KINDS, Sample, ask, chance, make_split, variants
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
