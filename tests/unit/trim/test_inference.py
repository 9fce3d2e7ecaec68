"""Online CLIP + TRIM + generation on the tiny models: batching, determinism, configs, timing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

from trim import TrimConfig
from trim.inference import (
    Answerer,
    inference_text,
    question_of_length,
    timed_generation,
)
from trim.model import LlavaTrim

QUESTIONS = [
    "What is the colour of the circle?\nAnswer the question using a single word or phrase.",
    "How many squares are there?",
    "<image>\nDescribe the picture briefly.",
    "Where is the red triangle located in the image?",
]


def drawn(seed: int, size: tuple[int, int]) -> Image.Image:
    """A noisy background with a few shapes: images that TRIM reduces to different counts."""
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    for i in range(seed % 3 + 1):
        x, y = 20 + 40 * i, 15 + 30 * i
        draw.ellipse((x, y, x + 60, y + 60), fill=(220, 30 * i, 30))
    return image


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    torch.manual_seed(0)
    settings = {"trim": TrimConfig().to_dict(), "encoder": {"path": str(tiny_models.clip), "layer": -2}}
    model = LlavaTrim.from_llm(tiny_models.llm, feature_dim=64, settings=settings)
    directory = tmp_path_factory.mktemp("model")
    return model.save(directory, tokenizer=AutoTokenizer.from_pretrained(str(tiny_models.llm)))


@pytest.fixture(scope="module")
def answerer(model_dir):
    return Answerer.load(model_dir)


@pytest.fixture(scope="module")
def images():
    return [drawn(0, (336, 336)), drawn(1, (480, 320)), drawn(2, (200, 420)), drawn(3, (97, 61))]


def test_loads_the_clip_path_and_trim_config_recorded_in_the_model_dir(answerer, tiny_models):
    assert answerer.trim_cfg == TrimConfig()
    assert answerer.encoder.path == str(tiny_models.clip)
    assert answerer.encoder.layer == -2


def test_batched_answers_equal_one_by_one_answers(answerer, images):
    batched = answerer.answer(images, QUESTIONS, max_new_tokens=6)
    single = [answerer.answer([image], [question], max_new_tokens=6)[0] for image, question in zip(images, QUESTIONS)]
    counts = [a.num_visual_tokens for a in batched]
    assert len(set(counts)) > 1, f"the test needs rows with different visual counts, got {counts}"
    assert all(c < 576 for c in counts)
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids and b.text == s.text
        assert b.num_visual_tokens == s.num_visual_tokens == b.num_kept + 1
        assert b.kept_indices == s.kept_indices and len(b.kept_indices) == b.num_kept
        assert b.scores.shape == (576,)
        assert 0 < len(b.token_ids) <= 6 or b.text == ""
    # Each row's prompt holds its own k_i visual tokens, nothing padded to 576.
    lengths = [len(answerer.prompt_ids(q)) - 1 + c for q, c in zip(QUESTIONS, counts)]
    assert [a.prompt_tokens for a in batched] == lengths


def test_greedy_generation_is_deterministic(answerer, images):
    first = answerer.answer(images[:2], QUESTIONS[:2], max_new_tokens=5)
    again = answerer.answer(images[:2], QUESTIONS[:2], max_new_tokens=5)
    assert [a.token_ids for a in first] == [a.token_ids for a in again]
    assert any(a.token_ids for a in first)  # the random tiny LLM does say something


def test_max_new_tokens_bounds_the_answer(answerer, images):
    for answer in answerer.answer(images, QUESTIONS, max_new_tokens=2):
        assert len(answer.token_ids) <= 2


def test_another_trim_config_changes_the_visual_counts(answerer, model_dir, images):
    default = [a.num_visual_tokens for a in answerer.answer(images, QUESTIONS, max_new_tokens=1)]
    ratio = Answerer.load(model_dir, trim_cfg=TrimConfig.fixed_ratio(0.25))
    assert [a.num_visual_tokens for a in ratio.answer(images, QUESTIONS, max_new_tokens=1)] == [144 + 1] * 4
    full = answerer.with_trim(dataclasses.replace(answerer.trim_cfg, selection="all"))
    answers = full.answer(images[:2], QUESTIONS[:2], max_new_tokens=1)
    assert [a.num_visual_tokens for a in answers] == [576, 576]
    assert answers[0].kept_indices == list(range(576))
    assert default != [145] * 4 and answerer.trim_cfg == TrimConfig()  # the answerer itself is untouched


def test_scoring_text_follows_text_at_inference():
    question = "<image>\nWhat is this?"
    assert inference_text(question, "first_question") == "What is this?"
    assert inference_text(question, "questions") == "What is this?"
    prompt = inference_text(question, "conversation")
    assert prompt.startswith("A chat between") and prompt.endswith("USER: What is this? ASSISTANT:")


def test_mismatched_inputs_are_refused(answerer, images):
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        answerer.answer(images[:2], QUESTIONS[:1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        answerer.answer(images[:1], QUESTIONS[:1], max_new_tokens=0)
    assert answerer.answer([], []) == []


def test_question_of_length(answerer):
    for n in (1, 8, 32):
        question = question_of_length(answerer.tokenizer, n)
        assert len(answerer.tokenizer(question, add_special_tokens=False)["input_ids"]) <= n


def test_timed_generation_times_trim_and_full(answerer, images):
    question = question_of_length(answerer.tokenizer, 16)
    trim_run, full_run = timed_generation(answerer, images[0], question, new_tokens=4, repeats=1, warmup=0)
    assert (trim_run.label, full_run.label) == ("TRIM", "full")
    assert full_run.visual_tokens == 576 and trim_run.visual_tokens < 576
    assert full_run.prompt_tokens - trim_run.prompt_tokens == 576 - trim_run.visual_tokens
    for run in (trim_run, full_run):
        assert run.encode_s > 0 and run.prefill_s > 0 and run.decode_s_per_token > 0
        assert run.ttft_s == pytest.approx(run.encode_s + run.prefill_s) and run.new_tokens == 4
