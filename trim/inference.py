"""Inference with online TRIM: CLIP + TRIM + LLaVA on images and questions, batched.

Pure PyTorch + transformers (no Ray, no MLflow). A batch of questions takes one CLIP image forward,
one CLIP text forward, one `trim_tokens` call and one `LlavaTrim.generate` call. Each row keeps its own
k_i visual tokens: nothing is padded to 576; the rows are left-padded only to the longest spliced
prompt of the batch (as any batched generation is).

    answerer = Answerer.load("checkpoints/tiny/model")          # CLIP path and TRIM config from the dir
    answers = answerer.answer([image], ["What is the colour of the cat?"], max_new_tokens=16)
    answers[0].text, answers[0].num_visual_tokens, answers[0].kept_indices

With the released `official` config (IQR over the whole batch, one count for all images) a row's
tokens depend on its batch, as in the released code; every other config gives each row the tokens it
would get alone.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trim.config import TrimConfig
from trim.conversation import IMAGE_TOKEN, TrimTextMode, generation_prompt, tokenize_prompt
from trim.core import TrimOutput, trim_tokens
from trim.encoders import ClipEncoder, checkpoint_hash
from trim.model import SETTINGS_FILE, Batch, LlavaTrim, pad_batch


@dataclass
class Answer:
    """One generated answer and what TRIM did to its image."""

    text: str
    """The decoded reply, stripped (LLaVA's answer-file `text`)."""
    token_ids: list[int]
    """Generated token ids, the eos not included."""
    num_visual_tokens: int
    """Visual tokens the LLM saw: kept patches + the aggregate (576 without TRIM)."""
    num_kept: int
    """Patches kept, the aggregate not counted."""
    kept_indices: list[int]
    """Raster indices (0..N-1) of the kept patches, ascending."""
    scores: np.ndarray
    """[N] float32: the softmax scores TRIM thresholded (for pictures)."""
    prompt_tokens: int
    """Length of the LLM's prompt, visual tokens included."""


@dataclass
class TimedRun:
    """Timings of one greedy generation for a batch of one (medians over the repeats)."""

    label: str
    """"TRIM" or "full" (all 576 patches)."""
    visual_tokens: int
    prompt_tokens: int
    """Prompt length the LLM prefills: template + question + visual tokens."""
    encode_s: float
    """CLIP image + text forward and TRIM."""
    prefill_s: float
    """Projector, LLM prefill and the first token's logits: the LLM's time to first token."""
    decode_s_per_token: float
    """Mean time of each further token (KV cache in use)."""
    new_tokens: int

    @property
    def ttft_s(self) -> float:
        """Time to first token as a user sees it: encoding + prefill."""
        return self.encode_s + self.prefill_s


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


def reduce_images(encoder: ClipEncoder, images: Sequence[Image.Image], texts: Sequence[str],
                  cfg: TrimConfig) -> TrimOutput:
    """CLIP over the images and texts (one forward each), then TRIM over the batch."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    if not images:
        raise ValueError("no images")
    features = encoder.encode_images(list(images))
    text_embeds = encoder.encode_texts(list(texts))
    return trim_tokens(features.features, features.patch_embeds, text_embeds, cfg)


class Answerer:
    """A LLaVA model on TRIM-reduced tokens with its CLIP towers: images + questions -> answers."""

    def __init__(self, model: LlavaTrim, tokenizer, encoder: ClipEncoder, trim_cfg: TrimConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        settings = model.settings
        if trim_cfg is None:
            trim_cfg = TrimConfig.from_dict(settings["trim"]) if "trim" in settings else TrimConfig()
        self.trim_cfg = trim_cfg
        expected = settings.get("feature_dim")
        if expected is not None and expected != encoder.feature_dim:
            raise ValueError(f"the model's projector takes {expected}-wide features, the CLIP checkpoint at "
                             f"{encoder.path} gives {encoder.feature_dim}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no eos token")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id

    @classmethod
    def load(cls, model_dir: str | Path, clip_path: str | Path | None = None, trim_cfg: TrimConfig | None = None,
             device: str = "cpu", dtype: torch.dtype = torch.float32) -> Answerer:
        """From an exported model directory (LlavaTrim.save) and a CLIP checkpoint. clip_path None:
        the encoder path recorded in the directory's settings; trim_cfg None: the TRIM config the
        model was trained with (its settings["trim"])."""
        settings = json.loads((Path(model_dir) / SETTINGS_FILE).read_text())
        encoder_info = settings.get("encoder", {})
        clip_path = clip_path or encoder_info.get("path")
        if not clip_path:
            raise ValueError(f"{model_dir} does not record a CLIP path; pass clip_path")
        recorded = encoder_info.get("config_hash")
        if recorded and recorded != checkpoint_hash(clip_path):
            warnings.warn(f"the CLIP checkpoint at {clip_path} (config hash {checkpoint_hash(clip_path)}) is not the "
                          f"one {model_dir} was trained with ({recorded})", stacklevel=2)
        model, tokenizer = LlavaTrim.load(model_dir, dtype=dtype)
        encoder = ClipEncoder(clip_path, layer=int(encoder_info.get("layer", -2)), device=device, dtype=dtype)
        return cls(model.to(device), tokenizer, encoder, trim_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def with_trim(self, trim_cfg: TrimConfig) -> Answerer:
        """The same model and encoder (shared, not copied) with another TRIM config."""
        return Answerer(self.model, self.tokenizer, self.encoder, trim_cfg)

    def scoring_texts(self, questions: Sequence[str]) -> list[str]:
        return [inference_text(q, self.trim_cfg.text_at_inference) for q in questions]

    def reduce(self, images: Sequence[Image.Image], questions: Sequence[str]) -> TrimOutput:
        """CLIP + TRIM for a batch: each image's visual tokens, scores and kept patches."""
        return reduce_images(self.encoder, images, self.scoring_texts(questions), self.trim_cfg)

    def prompt_ids(self, question: str) -> list[int]:
        """BOS + the vicuna_v1 generation prompt with the image placeholder."""
        return tokenize_prompt(generation_prompt(strip_image_tag(question), with_image=True), self.tokenizer)

    def _batch(self, questions: Sequence[str], visual: Sequence[torch.Tensor]) -> Batch:
        samples = [{"input_ids": self.prompt_ids(q), "visual": v} for q, v in zip(questions, visual)]
        batch = pad_batch(samples, self.pad_token_id)
        device = self.device
        return Batch(input_ids=batch.input_ids.to(device), labels=batch.labels.to(device),
                     attention_mask=batch.attention_mask.to(device), visual=[v.to(device) for v in batch.visual])

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 16) -> list[Answer]:
        """Greedy answers for (image, question) pairs, in one batch."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not questions:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        reduced = self.reduce(images, questions)
        batch = self._batch(questions, reduced.tokens)
        generated = self.model.generate(batch, max_new_tokens=max_new_tokens,
                                        eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_token_id)
        answers = []
        for b, ids in enumerate(generated):
            kept = torch.nonzero(reduced.keep_mask[b]).flatten().tolist()
            answers.append(Answer(
                text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                token_ids=list(ids),
                num_visual_tokens=int(reduced.tokens[b].shape[0]),
                num_kept=int(reduced.num_kept[b]),
                kept_indices=kept,
                scores=reduced.scores[b].detach().float().cpu().numpy(),
                prompt_tokens=int(batch.attention_mask[b].sum()) - 1 + int(reduced.tokens[b].shape[0]),
            ))
        return answers

    # Timing (the efficiency report) ------------------------------------------------------------

    @torch.inference_mode()
    def _time_once(self, image: Image.Image, question: str, new_tokens: int) -> tuple[float, float, float, int, int]:
        start = time.perf_counter()
        reduced = self.reduce([image], [question])
        encoded = time.perf_counter()
        batch = self._batch([question], reduced.tokens)
        llm = self.model.llm
        embeds, mask, _ = self.model.splice(batch)
        out = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            # Greedy, whatever the token: timing needs every step, so eos does not stop it.
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = llm(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        done = time.perf_counter()
        decode = (done - first) / (new_tokens - 1) if new_tokens > 1 else 0.0
        return encoded - start, first - encoded, decode, int(reduced.tokens[0].shape[0]), int(embeds.shape[1])

    def timed_generation(self, image: Image.Image, question: str, new_tokens: int = 16, repeats: int = 3,
                         warmup: int = 1) -> list[TimedRun]:
        """Time a batch of one with this answerer's TRIM config ("TRIM") and with all patches
        ("full": the same config with selection="all"): CLIP + TRIM, prefill + first token, and each
        further token, as medians over `repeats` runs after `warmup` untimed ones."""
        return timed_generation(self, image, question, new_tokens, repeats, warmup)


def timed_generation(answerer: Answerer, image: Image.Image, question: str, new_tokens: int = 16, repeats: int = 3,
                     warmup: int = 1) -> list[TimedRun]:
    """See Answerer.timed_generation. Returns [TRIM run, full run]."""
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need new_tokens >= 1, repeats >= 1, warmup >= 0; got {new_tokens}, {repeats}, {warmup}")
    runs = []
    for label, cfg in (("TRIM", answerer.trim_cfg), ("full", dataclasses.replace(answerer.trim_cfg, selection="all"))):
        timed = answerer.with_trim(cfg)
        for _ in range(warmup):
            timed._time_once(image, question, new_tokens)
        samples = [timed._time_once(image, question, new_tokens) for _ in range(repeats)]
        encode, prefill, decode = (statistics.median(s[i] for s in samples) for i in range(3))
        runs.append(TimedRun(label=label, visual_tokens=samples[0][3], prompt_tokens=samples[0][4], encode_s=encode,
                             prefill_s=prefill, decode_s_per_token=decode, new_tokens=new_tokens))
    return runs


def question_of_length(tokenizer, tokens: int, words: Sequence[str] | None = None) -> str:
    """A question of about `tokens` LLM tokens (never more when it can be helped): "What is shown
    in the picture" followed by filler words, cut at the longest word prefix that fits."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    words = list(words or "what is shown in the picture the colour of each object and where is it located".split())

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    text, i = "", 0
    while True:
        candidate = (text + " " + words[i % len(words)]).strip()
        if count(candidate) > tokens:
            return text or candidate
        text, i = candidate, i + 1
        if count(text) == tokens:
            return text
