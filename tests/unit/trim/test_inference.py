"""Online CLIP + TRIM + generation on the tiny models: batching, determinism, configs, the
low-latency path, timing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

from trim import TrimConfig
from trim.formats import load_llava_trim
from trim.inference import Answerer, default_dtype
from trim.questions import inference_text
from trim.reduction import reduce_images
from trim.timing import device_name, question_of_length, timed_generation

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
    model = load_llava_trim(tiny_models.llm, feature_dim=64, settings=settings)
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


def test_prepared_pixels_answer_as_their_images(answerer, images):
    """What evaluation's CPU tasks hand the actors (the host side's 8-bit pixels) gets the answers of
    the images themselves."""
    pixels = answerer.encoder.host.prepare(images).numpy()
    inputs = answerer.question_inputs(QUESTIONS)  # tokenized apart, as evaluation's CPU tasks do
    assert all(q.prompt_ids == answerer.prompt_ids(text) for q, text in zip(inputs, QUESTIONS))
    prepared = answerer.answer_prepared(pixels, QUESTIONS, max_new_tokens=6, inputs=inputs)
    direct = answerer.answer(images, QUESTIONS, max_new_tokens=6)
    assert [(a.token_ids, a.kept_indices) for a in prepared] == [(a.token_ids, a.kept_indices) for a in direct]
    assert [a.scores.tolist() for a in prepared] == [a.scores.tolist() for a in direct]
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        answerer.answer_prepared(pixels[:2], QUESTIONS[:1])
    with pytest.raises(ValueError, match="and 1 token inputs"):
        answerer.answer_prepared(pixels[:2], QUESTIONS[:2], inputs=inputs[:1])


def test_generation_batches_are_formed_by_prompt_length_and_answers_keep_the_questions_order(
        answerer, images, monkeypatch):
    """With batch_size, images are encoded batch_size at a time in the order given, and the answers
    generated batch_size at a time, shortest prompts first (a batch runs every row at its longest
    prompt); the answers are those of one batch, in the questions' order."""
    pixels = answerer.encoder.host.prepare(images).numpy()
    whole = answerer.answer_prepared(pixels, QUESTIONS, max_new_tokens=6)
    encoded, generated = [], []
    reduce_prepared, generate = answerer._reduce_prepared, answerer._generate

    def spy_reduce(batch_pixels, inputs):
        encoded.append(len(batch_pixels))
        return reduce_prepared(batch_pixels, inputs)

    def spy_generate(batch, *args):  # each row's prompt: its text (image token out) and its visual tokens
        generated.append([int(n) - 1 + v.shape[0] for n, v in zip(batch.attention_mask.sum(dim=1), batch.visual)])
        return generate(batch, *args)

    monkeypatch.setattr(answerer, "_reduce_prepared", spy_reduce)
    monkeypatch.setattr(answerer, "_generate", spy_generate)
    by_length = answerer.answer_prepared(pixels, QUESTIONS, max_new_tokens=6, batch_size=2)
    lengths = [a.prompt_tokens for a in whole]
    assert len(set(lengths)) > 2 and lengths != sorted(lengths), f"the test needs unordered lengths, got {lengths}"
    assert encoded == [2, 2]
    assert generated == [sorted(lengths)[:2], sorted(lengths)[2:]]
    assert [(a.token_ids, a.kept_indices, a.prompt_tokens) for a in by_length] == [
        (a.token_ids, a.kept_indices, a.prompt_tokens) for a in whole]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        answerer.answer_prepared(pixels, QUESTIONS, batch_size=0)


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


@pytest.mark.parametrize("low_latency", [False, True])
def test_timed_generation_times_trim_and_full(answerer, images, low_latency):
    question = question_of_length(answerer.tokenizer, 16)
    trim_run, full_run = timed_generation(answerer, images[0], question, new_tokens=4, repeats=1, warmup=0,
                                          low_latency=low_latency)
    assert (trim_run.label, full_run.label) == ("TRIM", "full")
    assert full_run.visual_tokens == 576 and trim_run.visual_tokens < 576
    assert full_run.prompt_tokens - trim_run.prompt_tokens == 576 - trim_run.visual_tokens
    for run in (trim_run, full_run):
        assert run.encode_s > 0 and run.prefill_s > 0 and run.decode_s_per_token > 0
        assert run.ttft_s == pytest.approx(run.encode_s + run.prefill_s) and run.new_tokens == 4
        assert run.low_latency is low_latency


def test_cpu_runs_in_fp32_and_is_named():
    assert default_dtype("cpu") == torch.float32
    assert device_name(torch.device("cpu")).startswith("CPU")


def test_official_answers_each_image_alone_whatever_the_batch(answerer, images):
    """The released evaluation answers one question at a time, so its batch-wide IQR is one image's:
    a batch of 4 gives each row what it gets alone, not one shared count."""
    official = answerer.with_trim(TrimConfig.official())
    batched = official.answer(images, QUESTIONS, max_new_tokens=6)
    single = [official.answer([image], [question], max_new_tokens=6)[0] for image, question in zip(images, QUESTIONS)]
    counts = [a.num_kept for a in batched]
    assert len(set(counts)) > 1, f"the test needs images with different counts alone, got {counts}"
    for b, s in zip(batched, single):
        assert (b.token_ids, b.num_kept, b.kept_indices) == (s.token_ids, s.num_kept, s.kept_indices)
    # Over the batch as given (the released training's micro-batch), one count for every image.
    shared = reduce_images(answerer.encoder, images, official.scoring_texts(QUESTIONS), official.trim_cfg)
    assert len(set(shared.num_kept.tolist())) == 1


def test_random_baseline_rows_do_not_depend_on_their_batch(answerer, images):
    random = answerer.with_trim(dataclasses.replace(TrimConfig(), selection="random"))
    batched = random.answer(images, QUESTIONS, max_new_tokens=1)
    single = [random.answer([image], [question], max_new_tokens=1)[0] for image, question in zip(images, QUESTIONS)]
    assert [a.kept_indices for a in batched] == [a.kept_indices for a in single]


@pytest.mark.parametrize("selection", ["trim", "all"])
def test_low_latency_answers_equal_the_eager_ones(answerer, images, selection):
    timed = answerer.with_trim(dataclasses.replace(answerer.trim_cfg, selection=selection))
    eager = timed.answer(images, QUESTIONS, max_new_tokens=8)
    fast = timed.answer(images, QUESTIONS, max_new_tokens=8, low_latency=True)
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert [a.text for a in fast] == [a.text for a in eager]
    assert [a.prompt_tokens for a in fast] == [a.prompt_tokens for a in eager]
    assert any(a.token_ids for a in fast)
    generator = answerer.low_latency_generator(8)
    assert generator is timed.low_latency_generator(8)  # one cache and one set of graphs for both configs
    assert not generator.use_graphs  # on the CPU the static-cache path runs without capture


def test_low_latency_answers_a_prompt_longer_than_its_buckets_eagerly(answerer, images):
    fresh = Answerer(answerer.model, answerer.tokenizer, answerer.encoder, answerer.trim_cfg)
    small = fresh.low_latency_generator(6, max_prompt_tokens=64, batch_size=2)
    assert small.buckets[-1] == 64 and small.batch_size == 2
    full = fresh.with_trim(dataclasses.replace(answerer.trim_cfg, selection="all"))
    fast = full.answer(images[:2], QUESTIONS[:2], max_new_tokens=6, low_latency=True)  # ~600-token prompts
    eager = full.answer(images[:2], QUESTIONS[:2], max_new_tokens=6)
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert fresh.low_latency_generator(6) is small
    assert fresh.low_latency_generator(6, batch_size=3).batch_size == 3  # a larger batch: a new generator
    assert fresh.low_latency_generator(6, batch_size=2).batch_size == 3  # which answers smaller ones


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replays_answer_as_the_eager_path_on_cuda(model_dir, images):
    assert next(Answerer.load(model_dir, device="cuda").model.parameters()).dtype in (torch.bfloat16, torch.float16)
    cuda = Answerer.load(model_dir, device="cuda", dtype=torch.float32)  # fp32: no bf16 near ties in the check
    eager = cuda.answer(images, QUESTIONS, max_new_tokens=8)
    fast = cuda.answer(images, QUESTIONS, max_new_tokens=8, low_latency=True)
    assert cuda.low_latency_generator(8).use_graphs
    assert [a.token_ids for a in fast] == [a.token_ids for a in eager]
    assert [a.kept_indices for a in fast] == [a.kept_indices for a in eager]
