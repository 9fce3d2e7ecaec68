"""Each image's TRIM-reduced visual tokens after the projector, for serving engines that take
precomputed image embeddings instead of pixels (vLLM's `image_embeds` with `enable_mm_embeds`).

An exported model (`jobs/export.py --format hf`, transformers' LlavaForConditionalGeneration) fed
pixels sees all 576 patch tokens. Fed these embeddings at its image positions instead (the prompt's
`<image>` expanded to k + 1 image tokens), it computes what this project's model computes on the
TRIM-reduced tokens: the same logits.

    answerer = Answerer.load("checkpoints/tiny/model")
    embeds = image_embeddings(answerer, [image], ["What is the colour of the cat?"])  # [[k + 1, hidden]]

    from vllm import LLM, SamplingParams                              # an hf export of the same model
    llm = LLM(model="exports/llava-tiny-hf", enable_mm_embeds=True)
    prompt = "... USER: <image>\\nWhat is the colour of the cat? ASSISTANT:"
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": embeds[0][None]}},
                       SamplingParams(temperature=0, max_tokens=16))

The embeddings depend on the question (TRIM scores the patches against it): an engine's cache must
not key them by the image alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from trim.conversation import IMAGE_TOKEN_INDEX
from trim.inference import Answerer, QuestionInputs


@torch.no_grad()
def project_tokens(answerer: Answerer, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Visual tokens ([k_i + 1, feature_dim] each, TRIM's output) through the model's projector:
    [k_i + 1, hidden] each, in the LLM's dtype, on its device (one projector call for all)."""
    if not tokens:
        return []
    projector = answerer.model.projector
    weight = next(projector.parameters())
    projected = projector(torch.cat([t.to(device=weight.device, dtype=weight.dtype) for t in tokens]))
    dtype = answerer.model.llm.get_input_embeddings().weight.dtype
    return [part.to(dtype) for part in projected.split([int(t.shape[0]) for t in tokens])]


def image_embeddings(answerer: Answerer, images: Sequence[Image.Image], questions: Sequence[str]) -> list[torch.Tensor]:
    """Each (image, question)'s TRIM-reduced visual tokens after the projector, [k_i + 1, hidden]:
    the tokens Answerer.answer splices in at the image's place (each image as it would be alone)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if not images:
        return []
    return project_tokens(answerer, answerer.reduce(images, questions).tokens)


def image_embeddings_prepared(answerer: Answerer, pixels: torch.Tensor | np.ndarray,
                              inputs: Sequence[QuestionInputs]) -> list[torch.Tensor]:
    """image_embeddings for images prepared on the host (uint8 [B, 3, H, W], ClipHost.prepare's) and
    their questions' token ids (Answerer.question_inputs), as a serving app's CPU side makes them."""
    pixels = torch.as_tensor(pixels)
    if len(pixels) != len(inputs):
        raise ValueError(f"{len(pixels)} images but {len(inputs)} token inputs")
    if not len(inputs):
        return []
    with torch.no_grad():
        reduced = answerer.reduce_prepared(pixels, list(inputs))
    return project_tokens(answerer, reduced.tokens)


def expand_image_placeholder(prompt_ids: Sequence[int], image_token_id: int, count: int) -> list[int]:
    """A prompt's ids (Answerer.prompt_ids: the image as IMAGE_TOKEN_INDEX) with the image as `count`
    copies of an exported model's image token: the positions its embeddings take."""
    if list(prompt_ids).count(IMAGE_TOKEN_INDEX) != 1:
        raise ValueError("the prompt must hold exactly one image placeholder")
    at = list(prompt_ids).index(IMAGE_TOKEN_INDEX)
    return list(prompt_ids[:at]) + [image_token_id] * count + list(prompt_ids[at + 1:])
