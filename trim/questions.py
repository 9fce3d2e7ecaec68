"""A question as the answerer takes it: the text TRIM scores patches against at inference (only the
question is known there), and its token ids in the CLIP and LLM tokenizers, made on the host."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trim.conversation import IMAGE_TOKEN, TrimTextMode, generation_prompt, tokenize_prompt


@dataclass
class QuestionInputs:
    """A question's token ids, made on the host (evaluation's CPU tasks make them beside the actors)."""

    clip_ids: list[int]
    """The TRIM scoring text (inference_text) in the CLIP tokenizer, truncated to the text tower's limit."""
    prompt_ids: list[int]
    """BOS + the vicuna_v1 generation prompt in the LLM tokenizer, the image as IMAGE_TOKEN_INDEX."""


def question_inputs(clip_host, tokenizer, questions: Sequence[str], mode: TrimTextMode) -> list[QuestionInputs]:
    """Each question's QuestionInputs. clip_host: a trim.encoders.ClipHost; tokenizer: the LLM's."""
    texts = [inference_text(q, mode) for q in questions]
    clip_ids = clip_host.tokenizer(texts, truncation=True, max_length=clip_host.max_text_tokens)["input_ids"]
    return [QuestionInputs(list(ids), prompt_ids(q, tokenizer)) for ids, q in zip(clip_ids, questions)]


def prompt_ids(question: str, tokenizer) -> list[int]:
    """BOS + the vicuna_v1 generation prompt with the image placeholder, in the LLM tokenizer."""
    return tokenize_prompt(generation_prompt(strip_image_tag(question), with_image=True), tokenizer)


def clip_batch(inputs: Sequence[QuestionInputs], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, L] of the questions' CLIP ids, right-padded to the longest, as
    the tokenizer pads a batch."""
    length = max(len(q.clip_ids) for q in inputs)
    ids = torch.full((len(inputs), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), length), dtype=torch.long)
    for b, q in enumerate(inputs):
        ids[b, :len(q.clip_ids)] = torch.tensor(q.clip_ids, dtype=torch.long)
        mask[b, :len(q.clip_ids)] = 1
    return ids, mask


def inference_text(question: str, mode: TrimTextMode) -> str:
    """The text TRIM scores patches against at inference, where only the question is known:
    the question itself ("questions", "first_question") or its templated prompt ("conversation")."""
    question = strip_image_tag(question)
    if mode == "conversation":
        return generation_prompt(question, with_image=False)
    return question


def strip_image_tag(question: str) -> str:
    """The question without LLaVA's `<image>` tag (evaluation files usually have none; the prompt
    adds it)."""
    return question.replace(IMAGE_TOKEN, "").strip()
