"""The evaluate job on real Ray (in-process local cluster) and a real MLflow server: answers in LLaVA's
format, rejects for unusable images, scores, pictures, and the MLflow run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pipelines.evaluate.answering import ANSWER_KEYS, answer_id
from tests.integration import servers
from tests.integration.conftest import REPO
from trim import TrimConfig
from trim.formats import load_llava_trim

GOOD = 6
MISSING_ID, CORRUPT_ID = 100, 101


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory, tiny_models):
    """A run root with an exported model (fresh projector: no training needed) and an evaluation
    split of GOOD questions plus one whose image is missing and one whose image is corrupt."""
    from synthetic.mixture import write_eval_split

    root = tmp_path_factory.mktemp("eval-run")
    questions, images, annotations = write_eval_split(root / "data" / "eval", num_questions=GOOD)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    extra = [{"question_id": MISSING_ID, "image": "nowhere.jpg", "text": "What is the colour of the square?"},
             {"question_id": CORRUPT_ID, "image": "corrupt.jpg", "text": "What is the colour of the circle?"}]
    # Out of order on purpose: the answers file comes back sorted by question_id.
    lines = questions.read_text().splitlines()
    questions.write_text("\n".join([json.dumps(extra[1]), *lines[::-1], json.dumps(extra[0])]) + "\n")
    with annotations.open("a") as f:
        for q in extra:
            f.write(json.dumps({"question_id": q["question_id"], "answers": ["red"] * 10, "kind": "vqa"}) + "\n")
    torch.manual_seed(0)
    settings = {"trim": TrimConfig().to_dict(), "encoder": {"path": str(tiny_models.clip), "layer": -2}}
    model = load_llava_trim(tiny_models.llm, feature_dim=64, settings=settings)
    model.save(root / "checkpoints" / "tiny" / "model", tokenizer=AutoTokenizer.from_pretrained(str(tiny_models.llm)))
    return root


@pytest.fixture(scope="module")
def argv(eval_root, tiny_models):
    overrides = [f"paths.root={eval_root}", f"paths.clip={tiny_models.clip}", f"paths.llm={tiny_models.llm}",
                 "eval.batch_size=4", "eval.max_new_tokens=4", "eval.num_pictures=2"]
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def first_run(eval_root, argv, ray_local):
    return load_job("evaluate").main(argv)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_answers_file_has_one_line_per_question_in_llavas_format(first_run, eval_root):
    answers = read_jsonl(Path(first_run.answers))
    assert Path(first_run.answers).parent.parent == eval_root / "eval"  # eval/<run>-<trim>-<hash>/
    assert [a["question_id"] for a in answers] == list(range(GOOD))
    prompts = {q["question_id"]: q["text"] for q in read_jsonl(eval_root / "data" / "eval" / "questions.jsonl")}
    question_lines = {n: json.loads(line)["question_id"] for n, line in
                      enumerate((eval_root / "data" / "eval" / "questions.jsonl").read_text().splitlines(), start=1)}
    for a in answers:
        assert tuple(a) == ANSWER_KEYS
        assert isinstance(a["text"], str) and a["prompt"] == prompts[a["question_id"]]
        assert a["model_id"] == "tiny" and a["answer_id"] == answer_id(a["question_id"], "tiny", a["metadata"]["line"])
        assert question_lines[a["metadata"]["line"]] == a["question_id"]  # its line in the question file
        assert len(a["answer_id"]) == 22
        meta = a["metadata"]
        assert meta["trim"] == "default" and meta["category"] == "colour"
        assert 1 <= meta["visual_tokens"] < 576 and meta["visual_tokens"] == meta["kept"] + 1
    assert len({a["answer_id"] for a in answers}) == GOOD


def test_the_jobs_answers_are_the_answerers_own(first_run, eval_root, tiny_models):
    """Images prepared and questions tokenized in the job's CPU tasks, answered in its actors: the
    tokens the Answerer gives the same questions in process."""
    from PIL import Image

    from trim.inference import Answerer

    answers = {a["question_id"]: a for a in read_jsonl(Path(first_run.answers))}
    questions = [q for q in read_jsonl(eval_root / "data" / "eval" / "questions.jsonl") if q["question_id"] in answers]
    images = [Image.open(eval_root / "data" / "eval" / "images" / q["image"]).convert("RGB") for q in questions]
    answerer = Answerer.load(eval_root / "checkpoints" / "tiny" / "model", tiny_models.clip, device="cpu")
    direct = answerer.answer(images, [q["text"] for q in questions], max_new_tokens=4)
    assert [answers[q["question_id"]]["text"] for q in questions] == [a.text for a in direct]
    assert [answers[q["question_id"]]["metadata"]["kept"] for q in questions] == [a.num_kept for a in direct]


def test_unusable_images_are_set_aside_and_scored_as_missing(first_run, eval_root):
    rejects = read_jsonl(Path(first_run.rejects_file))
    assert {r["question_id"]: r["reason"] for r in rejects} == {MISSING_ID: "missing image",
                                                                CORRUPT_ID: "unreadable image"}
    assert all(r["detail"] for r in rejects)
    metrics = first_run.metrics
    assert metrics["n"] == GOOD + 2 and metrics["answered"] == GOOD and metrics["missing"] == 2
    assert metrics["rejects"] == 2 and metrics["answers"] == GOOD and metrics["questions"] == GOOD + 2
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["mean_visual_tokens"] > 0
    assert first_run.reject_reasons == {"missing image": 1, "unreadable image": 1}
    pictures = sorted(p.name for p in (Path(first_run.answers).parent / "pictures").iterdir())
    assert pictures == ["question-0.png", "question-1.png"]


def test_local_tracking_keeps_the_artifacts_beside_the_store(first_run, eval_root):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{eval_root}/mlflow.db")
    run = client.get_run(first_run.mlflow_run_id)
    assert run.info.run_name == "tiny-eval" and run.data.metrics["missing"] == 2
    stored = list((eval_root / "mlartifacts").rglob("answers.jsonl"))
    assert len(stored) == 1 and stored[0].read_bytes() == Path(first_run.answers).read_bytes()
    assert len(list((eval_root / "mlartifacts").rglob("question-*.png"))) == 2


def test_rerun_against_mlflow_server_logs_metrics_answers_and_pictures(first_run, eval_root, argv, monkeypatch,
                                                                      tmp_path):
    import mlflow

    answers_before = Path(first_run.answers).read_bytes()
    with servers.mlflow_server(tmp_path) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        again = load_job("evaluate").main(argv)  # same inputs: answers reused, scored and logged again
        assert again.answers == first_run.answers and Path(again.answers).read_bytes() == answers_before
        assert again.metrics == first_run.metrics
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("trim-llava-tiny")
        runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tiny-eval'")
        assert len(runs) == 1 and runs[0].info.run_id == again.mlflow_run_id
        run = runs[0]
        assert run.data.metrics["accuracy"] == pytest.approx(first_run.metrics["accuracy"])
        assert run.data.metrics["missing"] == 2 and run.data.metrics["n"] == GOOD + 2
        assert run.data.params["trim_name"] == "default" and run.data.params["model_id"] == "tiny"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"answers.jsonl", "rejects.jsonl", "pictures"} <= artifacts
        assert len(client.list_artifacts(run.info.run_id, "pictures")) == 2
        local = client.download_artifacts(run.info.run_id, "answers.jsonl", str(tmp_path / "download"))
        assert open(local, "rb").read() == answers_before


def test_a_failed_full_evaluation_is_never_scored_as_the_trim_models(first_run, eval_root, argv, monkeypatch):
    """`--trim full` failing after writing its answers, then `--trim model`: the TRIM model's own
    answers are scored, and the full run, done again, answers into its own folder."""
    import pipelines.evaluate.stage

    def fail(*args, **kwargs):
        raise RuntimeError("scoring crashed")

    trim_answers, stamp = Path(first_run.answers).read_bytes(), Path(first_run.answers).stat().st_mtime_ns
    with monkeypatch.context() as patch:
        patch.setattr(pipelines.evaluate.stage, "_metrics", fail)
        with pytest.raises(RuntimeError, match="scoring crashed"):
            load_job("evaluate").main([*argv, "--trim", "full"])
    written = [p for p in (eval_root / "eval").glob("tiny-default-all-*/answers.jsonl")]
    assert len(written) == 1 and all(a["metadata"]["visual_tokens"] == 576 for a in read_jsonl(written[0]))
    again = load_job("evaluate").main([*argv, "--trim", "model"])
    assert again.answers == first_run.answers and Path(again.answers).read_bytes() == trim_answers
    assert Path(again.answers).stat().st_mtime_ns == stamp  # reused, not answered again
    assert again.metrics["mean_visual_tokens"] == first_run.metrics["mean_visual_tokens"] < 576
    full = load_job("evaluate").main([*argv, "--trim", "full"])  # not reused: it never finished
    assert full.answers == str(written[0]) and full.trim_name == "default/all"
    assert full.metrics["mean_visual_tokens"] == 576 and Path(first_run.answers).read_bytes() == trim_answers


def test_an_evaluation_on_s3_answers_as_the_local_one(first_run, eval_root, tiny_models, s3_env, monkeypatch):
    """Run root (questions, images, the exported model) on S3, the job in its own process and Ray: the
    CPU tasks read the images and the model's tokenizer from there (its weights left behind), the
    actors the model; the same answers as the local run."""
    from pipelines import storage
    from tests.integration.conftest import run_job

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)  # the in-test s3fs client
    fs, _ = storage.fsspec_fs("s3://trim-eval/")
    fs.mkdir("trim-eval")
    fs.put(str(eval_root / "data"), "trim-eval/run/data", recursive=True)
    fs.put(str(eval_root / "checkpoints"), "trim-eval/run/checkpoints", recursive=True)
    env = dict(s3_env, MLFLOW_TRACKING_URI=f"sqlite:///{eval_root}/mlflow-s3.db")
    run_job("evaluate", "paths.root=s3://trim-eval/run", f"paths.clip={tiny_models.clip}",
            f"paths.llm={tiny_models.llm}", "eval.batch_size=4", "eval.max_new_tokens=4", "eval.num_pictures=2",
            env=env)
    written = [p for p in fs.find("trim-eval/run/eval") if p.endswith("/answers.jsonl")]
    assert len(written) == 1
    answers = [json.loads(line) for line in storage.read_bytes(f"s3://{written[0]}").decode().splitlines() if line]
    assert [(a["question_id"], a["text"]) for a in answers] == [
        (a["question_id"], a["text"]) for a in read_jsonl(Path(first_run.answers))]


def test_questions_sharing_an_id_are_answered_and_scored_each(first_run, eval_root, argv, tmp_path):
    """LLaVA's TextVQA and MME question files give an image's questions one id (the image's): each is
    answered, in line order, scored against the annotation naming its text; a question repeated whole
    is set aside as a duplicate, by line."""
    data = eval_root / "data" / "eval"
    image = next(q["image"] for q in read_jsonl(data / "questions.jsonl") if q["question_id"] == 0)
    texts = ["What is the colour of the square?\nAnswer the question using a single word or phrase.",
             "What is the shape?\nAnswer the question using a single word or phrase."]
    questions = [{"question_id": "img-a", "image": image, "text": texts[1]},
                 {"question_id": "img-a", "image": image, "text": texts[0]},
                 {"question_id": "img-a", "image": image, "text": texts[1]},  # line 1 again
                 {"question_id": 3, "image": image, "text": texts[0]}]
    (data / "shared.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    annotations = [{"question_id": "img-a", "text": "what is the shape?", "answers": ["circle"] * 10},
                   {"question_id": "img-a", "text": "What is the colour of the square?", "answers": ["red"] * 10},
                   {"question_id": 3, "answers": ["red"] * 10}]
    (data / "shared-annotations.jsonl").write_text("".join(json.dumps(a) + "\n" for a in annotations))
    # Annotations that do not tell the shared id's questions apart: scoring fails, naming the id ...
    (data / "id-only.jsonl").write_text("".join(json.dumps({k: v for k, v in a.items() if k != "text"}) + "\n"
                                                for a in annotations[1:]))
    args = [*argv, "--set", f"paths.eval_questions={data / 'shared.jsonl'}", "--set", "eval.num_pictures=3"]
    with pytest.raises(ValueError, match="two answers for question_id='img-a'"):
        load_job("evaluate").main([*args, "--set", f"paths.eval_annotations={data / 'id-only.jsonl'}"])
    (written,) = [p for p in (eval_root / "eval").glob("*/answers.jsonl") if "img-a" in p.read_text()]
    stamp = written.stat().st_mtime_ns
    # ... and the answers stay complete: scored against the right annotations without answering again.
    manifest = load_job("evaluate").main([*args, "--set", f"paths.eval_annotations={data / 'shared-annotations.jsonl'}"])
    assert manifest.answers == str(written) and written.stat().st_mtime_ns == stamp
    answers = read_jsonl(Path(manifest.answers))
    assert [(a["question_id"], a["metadata"]["line"], a["prompt"]) for a in answers] == [
        (3, 4, texts[0]), ("img-a", 1, texts[1]), ("img-a", 2, texts[0])]
    assert len({a["answer_id"] for a in answers}) == 3
    rejects = read_jsonl(Path(manifest.rejects_file))
    assert [(r["question_id"], r["line"], r["reason"]) for r in rejects] == [("img-a", 3, "duplicate question")]
    assert manifest.metrics["n"] == 3 and manifest.metrics["answered"] == 3 and manifest.metrics["missing"] == 0
    pictures = sorted(p.name for p in (Path(manifest.answers).parent / "pictures").iterdir())
    assert pictures == ["question-3.png", "question-img-a-line1.png", "question-img-a-line2.png"]
    # The pictures job draws each of them too.
    drawn = load_job("pictures").main([*args, "--questions", "img-a", "--out", str(tmp_path / "drawn")])
    assert sorted(p.name for p in drawn) == ["question-img-a-line1.png", "question-img-a-line2.png"]
