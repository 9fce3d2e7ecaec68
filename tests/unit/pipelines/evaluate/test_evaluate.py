"""The evaluate stage's pure core, without Ray or models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines import storage
from pipelines.evaluate import outputs as eval_outputs
from pipelines.evaluate.answering import (
    ANSWER_KEYS,
    answer_id,
    answer_questions,
    answer_record,
    busy_seconds,
    resolve_trim,
    trim_name,
)
from pipelines.evaluate.inputs import LINE, fetch_bytes, pixels_of, prepare_questions
from pipelines.evaluate.questions import parse_questions, question_key, record_key
from pipelines.evaluate.stage import _metrics
from synthetic.tiny_models import shipped_clip
from trim import TrimConfig
from trim.encoders import ClipHost
from trim.inference import Answer
from trim.questions import QuestionInputs


class FakeAnswerer:
    """Answers "red" with 3 visual tokens; records the batches it was given."""

    trim_cfg = TrimConfig()

    def __init__(self):
        self.batches = []
        self.low_latency = []
        self.inputs = []
        self.batch_sizes = []

    def answer_prepared(self, pixels, questions, max_new_tokens, low_latency=False, inputs=None, batch_size=None):
        assert pixels.dtype == np.uint8 and pixels.shape[1:] == (3, 336, 336) and len(pixels) == len(questions)
        self.inputs.append(inputs)
        self.batches.append(len(questions))
        self.batch_sizes.append(batch_size)
        self.low_latency.append(low_latency)
        return [Answer(text="red", token_ids=[5], num_visual_tokens=3, num_kept=2, kept_indices=[4, 9],
                       scores=np.full(576, 1 / 576, dtype=np.float32), prompt_tokens=40) for _ in questions]


def test_parse_questions_sets_aside_malformed_and_refuses_foreign_files():
    lines = [{"question_id": 1, "image": "a.jpg", "text": "What?"}, {"question_id": 2, "text": "No image"},
             {"question_id": "x", "image": "b.jpg", "text": "  "}]
    questions, rejects = parse_questions("\n".join(json.dumps(x) for x in lines).encode() + b"\n\n", "q.jsonl")
    assert [q["question_id"] for q in questions] == [1] and questions[0][LINE] == 1
    assert [(r["question_id"], r["line"], r["reason"]) for r in rejects] == [(2, 2, "malformed question"),
                                                                             ("x", 3, "malformed question")]
    with pytest.raises(ValueError, match="q.jsonl:1: record has no question_id"):
        parse_questions(b'{"id": 1}\n', "q.jsonl")


def test_questions_may_share_an_id_as_in_llavas_textvqa_and_mme_files():
    # LLaVA's TextVQA file gives each question its image's id; MME's, its image file (a yes and a no question).
    lines = [{"question_id": "003a8ae2ef43b901", "image": "a.jpg", "text": "what brand is this?\nReference OCR token: x"},
             {"question_id": "003a8ae2ef43b901", "image": "a.jpg", "text": "what year is it?\nReference OCR token: x"},
             {"question_id": "artwork/10002.jpg", "image": "b.jpg", "text": "Is this by Monet? Please answer yes or no."},
             {"question_id": "artwork/10002.jpg", "image": "b.jpg", "text": "Is this by Monet?  Please answer yes or no."}]
    questions, rejects = parse_questions("\n".join(json.dumps(x) for x in lines).encode(), "q.jsonl")
    assert [(q["question_id"], q[LINE]) for q in questions] == [("003a8ae2ef43b901", 1), ("003a8ae2ef43b901", 2),
                                                                ("artwork/10002.jpg", 3)]
    # the same id and text again is the same question twice: set aside, naming both lines
    assert [(r["line"], r["reason"]) for r in rejects] == [(4, "duplicate question")]
    assert "q.jsonl:4" in rejects[0]["detail"] and "line 3" in rejects[0]["detail"]
    answers = [answer_record(q, Answer(text="x", token_ids=[], num_visual_tokens=3, num_kept=2, kept_indices=[],
                                             scores=np.zeros(0, dtype=np.float32), prompt_tokens=9), "m", "default")
               for q in questions]
    assert [a["metadata"]["line"] for a in answers] == [1, 2, 3]
    assert len({a["answer_id"] for a in answers}) == 3
    shuffled = [answers[2], answers[1], answers[0]]
    assert sorted(shuffled, key=record_key) == answers


def test_ids_sort_numerically_and_answer_ids_are_deterministic():
    assert sorted([10, "b", 2, "a", 1], key=question_key) == [1, 2, 10, "a", "b"]
    assert answer_id(3, "tiny") == answer_id(3, "tiny") != answer_id(3, "other") != answer_id("3", "tiny")
    assert len(answer_id(3, "tiny")) == 22


def test_trim_names_and_resolution():
    assert trim_name(TrimConfig()) == "default"
    assert trim_name(TrimConfig.paper()) == "paper" and trim_name(TrimConfig.official()) == "official"
    assert trim_name(TrimConfig.fixed_ratio(0.05)) == "ratio:0.05"
    assert trim_name(TrimConfig(selection="all")) == "default/all"
    assert trim_name(TrimConfig(iqr_multiplier=3.0)) == "custom"
    model = {**TrimConfig.paper().to_dict(), "text_at_inference": "questions"}
    recipe = TrimConfig()
    assert resolve_trim("model", recipe, model) == TrimConfig.from_dict(model)
    assert resolve_trim("model", recipe, None) == recipe
    assert resolve_trim("recipe", recipe, model) == recipe
    assert resolve_trim("full", recipe, model).selection == "all"
    official = resolve_trim("official", recipe, model)
    assert trim_name(official) == "official" and official.text_at_inference == "questions"


def test_answer_questions_rejects_unusable_images_and_batches_the_rest(tmp_path):
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    questions = [{"question_id": i, "image": f"{i}.png", "text": f"Q{i}", "category": "c", LINE: i + 1} for i in range(5)]
    questions += [{"question_id": 7, "image": "gone.png", "text": "Q", LINE: 6},
                  {"question_id": 8, "image": "bad.png", "text": "Q", LINE: 7}]
    host = ClipHost(shipped_clip())
    prepared = prepare_questions(host, questions, str(tmp_path))  # evaluation's CPU stage
    assert [r["kind"] for r in prepared] == ["reject"] * 2 + ["question"] * 5
    # The pixels handed on are the host's own preprocessing of each image.
    assert np.array_equal(pixels_of(prepared[2:3]), host.prepare([Image.open(tmp_path / "0.png").convert("RGB")]).numpy())
    engine = FakeAnswerer()
    rows = answer_questions(engine, prepared, 4, "m", batch_size=2, picture_lines=[2])
    assert engine.batches == [2, 2, 1] and engine.low_latency == [False] * 3 and engine.batch_sizes == [2] * 3
    # sort_window batches go to the answerer together, to be batched by prompt length there
    answer_questions(engine, prepared, 4, "m", batch_size=2, sort_window=2)
    assert engine.batches[3:] == [4, 1] and engine.batch_sizes[3:] == [2, 2]
    del engine.batches[3:], engine.inputs[3:], engine.low_latency[3:], engine.batch_sizes[3:]
    with pytest.raises(ValueError, match="sort_window=0"):
        answer_questions(engine, prepared, 4, "m", batch_size=2, sort_window=0)
    answer_questions(engine, prepared[2:3], 4, "m", batch_size=2, low_latency=True)
    assert engine.low_latency[-1] is True
    assert engine.inputs[:3] == [None] * 3  # not tokenized: the actor tokenizes
    # Tokenized in the CPU stage: each question's ids reach the actor with it.
    def tokenize(texts):
        return [QuestionInputs(clip_ids=[len(t)], prompt_ids=[1, len(t)]) for t in texts]

    tokenized = prepare_questions(host, questions, str(tmp_path), tokenize)
    answer_questions(engine, tokenized, 4, "m", batch_size=5)
    assert engine.inputs[-1] == tokenize([q["text"] for q in questions[:5]])
    answers = [json.loads(r["record"]) for r in rows if r["kind"] == "answer"]
    rejects = {json.loads(r["record"])["question_id"]: (json.loads(r["record"])["line"], json.loads(r["record"])["reason"])
               for r in rows if r["kind"] == "reject"}
    assert rejects == {7: (6, "missing image"), 8: (7, "unreadable image")}
    assert [a["question_id"] for a in answers] == [0, 1, 2, 3, 4]
    assert all(tuple(a) == ANSWER_KEYS for a in answers)
    assert answers[0]["metadata"] == {"visual_tokens": 3, "kept": 2, "trim": "default", "line": 1, "category": "c"}
    with_scores = [r for r in rows if r["scores"]]
    assert len(with_scores) == 1 and json.loads(with_scores[0]["kept"]) == [4, 9]
    assert json.loads(with_scores[0]["record"])["metadata"]["line"] == 2
    assert len(with_scores[0]["scores"]) == 576 * 2
    # Each answer row carries its batch's answering interval; the rejects none.
    spans = [(r["started"], r["ended"]) for r in rows if r["kind"] == "answer"]
    assert all(0 < start <= end for start, end in spans) and len(set(spans)) == 3
    assert all(r["started"] == r["ended"] == 0.0 for r in rows if r["kind"] == "reject")


def test_a_batchs_images_come_in_one_fetch_with_errors_in_place(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "b.png").write_bytes(b"BB")
    (tmp_path / "folder").mkdir()
    out = fetch_bytes([str(tmp_path / name) for name in ("a.png", "gone.png", "b.png", "folder")])
    assert out[0] == b"A" and out[2] == b"BB"
    assert isinstance(out[1], FileNotFoundError) and isinstance(out[3], OSError)
    assert fetch_bytes([]) == []


def test_throughput_counts_overlapping_actors_once():
    assert busy_seconds([]) == 0.0
    assert busy_seconds([(0.0, 2.0), (0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.8)]) == pytest.approx(4.0)
    answers = [{"metadata": {"visual_tokens": 3}}] * 6
    metrics = _metrics(answers, [], questions=7, seconds=30.0, answering_s=4.0)
    assert metrics["questions_per_s"] == 1.5 and metrics["inference_s"] == 4.0 and metrics["seconds"] == 30.0
    assert _metrics([], [], questions=0, seconds=1.0, answering_s=0.0)["questions_per_s"] == 0.0


@pytest.fixture()
def eval_inputs(tmp_path):
    """A run root with a model folder, a CLIP folder, a question file and an image folder."""
    from pipelines.config import load_recipe

    recipe = load_recipe("tiny", [f"paths.root={tmp_path}"])
    for folder in ("checkpoints/tiny/model/llm", "models/clip", "data/eval/images"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "checkpoints/tiny/model/llm/model.safetensors").write_bytes(b"weights")
    (tmp_path / "checkpoints/tiny/model/trim_llava.json").write_text("{}")
    (tmp_path / "models/clip/model.safetensors").write_bytes(b"clip")
    (tmp_path / "data/eval/images/0.png").write_bytes(b"png")
    questions = b'{"question_id": 0, "image": "0.png", "text": "Q"}\n'
    (tmp_path / "data/eval/questions.jsonl").write_bytes(questions)
    return recipe, recipe.paths.model_dir("tiny"), questions


def identity_of(recipe, model_dir, questions, trim=None, accelerator="CPU"):
    return eval_outputs.identity(recipe, model_dir, trim or TrimConfig(), questions, accelerator)


def test_each_model_and_trim_setting_answers_into_its_own_folder(eval_inputs):
    recipe, model_dir, questions = eval_inputs
    model = identity_of(recipe, model_dir, questions)
    full = identity_of(recipe, model_dir, questions, TrimConfig(selection="all"))
    folder = eval_outputs.output_dir(recipe.paths.eval_dir, "tiny", "default", model)
    assert folder.startswith(f"{recipe.paths.eval_dir}/tiny-default-")
    assert eval_outputs.output_dir(recipe.paths.eval_dir, "tiny", "default/all", full).startswith(
        f"{recipe.paths.eval_dir}/tiny-default-all-")
    # Whatever changes the answers changes the identity, so the folder.
    changed = [full, identity_of(recipe, model_dir, questions, accelerator="GPU"),
               identity_of(recipe, model_dir, questions + b'{"question_id": 1, "image": "0.png", "text": "R"}\n')]
    recipe.eval.max_new_tokens += 1
    changed.append(identity_of(recipe, model_dir, questions))
    recipe.eval.max_new_tokens -= 1
    weights = recipe.paths.root + "/checkpoints/tiny/model/llm/model.safetensors"
    with open(weights, "ab") as f:  # retrained: same names, other bytes
        f.write(b"more")
    changed.append(identity_of(recipe, model_dir, questions))
    with open(recipe.paths.eval_images + "/1.png", "wb") as f:
        f.write(b"png")
    changed.append(identity_of(recipe, model_dir, questions))
    hashes = {eval_outputs.identity_hash(x) for x in [model, *changed]}
    assert len(hashes) == 1 + len(changed)
    assert eval_outputs.identity_hash(identity_of(recipe, model_dir, questions)) == eval_outputs.identity_hash(
        changed[-1])  # and the same inputs give the same identity


def test_answers_are_reused_only_from_a_finished_evaluation_of_the_same_identity(eval_inputs):
    """`--trim full` failing after its answers were written, then `--trim model`: today's bug scored
    the full answers as the TRIM model's."""
    from pipelines.manifests import EvalManifest

    recipe, model_dir, questions = eval_inputs
    model = identity_of(recipe, model_dir, questions)
    full = identity_of(recipe, model_dir, questions, TrimConfig(selection="all"))
    model_dir_out = eval_outputs.output_dir(recipe.paths.eval_dir, "tiny", "default", model)
    full_dir_out = eval_outputs.output_dir(recipe.paths.eval_dir, "tiny", "default/all", full)

    def write(folder, value, finished):
        answers, rejects = f"{folder}/answers.jsonl", f"{folder}/rejects.jsonl"
        storage.write_bytes(answers, b'{"question_id": 0}\n')
        storage.write_bytes(rejects, b"")
        if finished:
            EvalManifest(identity=value, trim_name="x", answers=answers, rejects_file=rejects).write(folder)

    write(model_dir_out, model, finished=True)
    write(full_dir_out, full, finished=False)  # failed before its manifest
    assert eval_outputs.stored(full_dir_out, full) is None  # not even for itself
    assert eval_outputs.stored(model_dir_out, model).identity == model
    assert eval_outputs.stored(model_dir_out, full) is None  # a manifest of another identity
    eval_outputs.forget(model_dir_out)  # a rerun writing again: nothing there is trusted meanwhile
    assert eval_outputs.stored(model_dir_out, model) is None


def test_an_unknown_generation_is_refused_before_any_work(tmp_path):
    from pipelines.config import Recipe
    from pipelines.evaluate.stage import run_evaluate

    recipe = Recipe()
    recipe.eval.generation = "fast"
    with pytest.raises(ValueError, match="eval.generation='fast': expected one of"):
        run_evaluate(recipe, str(tmp_path / "no-model"))


def test_a_scoring_error_names_the_users_annotation_file_and_line(tmp_path):
    from pipelines.evaluate.stage import _score

    annotations = tmp_path / "my-annotations.jsonl"
    annotations.write_text('{"question_id": 1, "answers": ["cat"]}\n{"question_id": 2}\n')
    answers = [{"question_id": 1, "prompt": "q", "text": "cat"}, {"question_id": 2, "prompt": "q", "text": "dog"}]
    with pytest.raises(ValueError) as raised:
        _score(answers, str(annotations), "vqa", [])
    assert f"{annotations}:2" in str(raised.value) and "tmp" + "/annotations.jsonl" not in str(raised.value)
