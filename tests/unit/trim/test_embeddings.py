"""TRIM-reduced image embeddings for engines that take them (trim.embeddings): placed at the image
positions of the hf export (LlavaForConditionalGeneration), they give the project's own logits; and,
where vLLM and a GPU are, vLLM answers with them what Answerer.answer answers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from trim import TrimConfig
from trim.batching import pad_batch
from trim.embeddings import expand_image_placeholder, image_embeddings, image_embeddings_prepared
from trim.formats import export_model, load_llava_trim
from trim.inference import Answerer

QUESTIONS = ["What is the colour of the square?", "Where is the red circle?"]


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    torch.manual_seed(0)
    settings = {"trim": TrimConfig().to_dict(), "encoder": {"path": str(tiny_models.clip), "layer": -2}}
    model = load_llava_trim(tiny_models.llm, feature_dim=64, settings=settings)
    with torch.no_grad():  # a projector far from zero, so a wrong one shows in the logits
        for p in model.projector.parameters():
            p.normal_(0, 0.5)
    return model.save(tmp_path_factory.mktemp("model"), tokenizer=AutoTokenizer.from_pretrained(str(tiny_models.llm)))


@pytest.fixture(scope="module")
def answerer(model_dir):
    return Answerer.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def hf_dir(model_dir, tmp_path_factory):
    return export_model(model_dir, tmp_path_factory.mktemp("out") / "llava-tiny-hf", "hf")


def images() -> list[Image.Image]:
    out = []
    for i, colour in enumerate([(220, 30, 30), (30, 200, 60)]):
        noise = torch.rand(180 + 40 * i, 300, 3, generator=torch.Generator().manual_seed(i)) * 255
        picture = Image.fromarray(noise.to(torch.uint8).numpy())
        ImageDraw.Draw(picture).rectangle([60 + 30 * i, 40, 140 + 30 * i, 120], fill=colour)
        out.append(picture)
    return out


def test_embeddings_are_the_reduced_tokens_after_the_projector(answerer):
    embeds = image_embeddings(answerer, images(), QUESTIONS)
    reduced = answerer.reduce(images(), QUESTIONS)
    hidden = answerer.model.llm.config.hidden_size
    for e, tokens, kept in zip(embeds, reduced.tokens, reduced.num_kept.tolist()):
        assert e.shape == (kept + 1, hidden) and kept + 1 < 576  # TRIM kept some patches, plus the aggregate
        with torch.no_grad():
            torch.testing.assert_close(e, answerer.model.projector(tokens))
    prepared = image_embeddings_prepared(answerer, answerer.encoder.host.prepare(images()),
                                         answerer.question_inputs(QUESTIONS))
    for a, b in zip(prepared, embeds):
        torch.testing.assert_close(a, b)


def test_embeddings_at_the_hf_exports_image_positions_give_the_projects_logits(answerer, hf_dir):
    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    image_id = hf.config.image_token_id
    vocab = answerer.model.llm.config.vocab_size
    reduced = answerer.reduce(images(), QUESTIONS)
    for question, embeds, tokens in zip(QUESTIONS, image_embeddings(answerer, images(), QUESTIONS), reduced.tokens):
        ids = answerer.prompt_ids(question)
        expanded = torch.tensor([expand_image_placeholder(ids, image_id, len(embeds))])
        with torch.no_grad():
            inputs = hf.get_input_embeddings()(expanded)
            inputs[expanded == image_id] = embeds
            theirs = hf(inputs_embeds=inputs).logits[..., :vocab]
            spliced = answerer.model.embed(pad_batch([{"input_ids": ids, "visual": tokens}], pad_token_id=0))
            ours = answerer.model.llm(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask).logits
        assert theirs.shape == ours.shape == (1, len(ids) - 1 + len(embeds), vocab)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_placeholder_expansion_is_checked():
    assert expand_image_placeholder([1, -200, 5], 9, 3) == [1, 9, 9, 9, 5]
    with pytest.raises(ValueError):
        expand_image_placeholder([1, 5], 9, 3)


@pytest.mark.gpu
def test_vllm_answers_with_the_embeddings_what_the_answerer_answers(answerer, hf_dir):
    vllm = pytest.importorskip("vllm")
    from trim.conversation import generation_prompt

    llm = vllm.LLM(model=str(hf_dir), enable_mm_embeds=True, dtype="float32", enforce_eager=True,
                   gpu_memory_utilization=0.3)
    expected = answerer.answer(images(), QUESTIONS, max_new_tokens=8)
    requests = [{"prompt": generation_prompt(q, with_image=True),
                 "multi_modal_data": {"image": e[None].float().cpu()}}
                for q, e in zip(QUESTIONS, image_embeddings(answerer, images(), QUESTIONS))]
    outputs = llm.generate(requests, vllm.SamplingParams(temperature=0, max_tokens=8))
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert [g[:len(e.token_ids)] for g, e in zip(got, expected)] == [e.token_ids for e in expected]
