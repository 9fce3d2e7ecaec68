"""Timing one question with and without TRIM (the efficiency report's measured rows), on whatever
device the answerer is on: CLIP + TRIM, prefill to the first token, each further token; eager, or on
the low-latency path (trim.low_latency: static cache, CUDA graphs on CUDA). CUDA work is synchronised
before each clock read.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from trim.inference import Answerer


@dataclass
class TimedRun:
    """Timings of one greedy generation for a batch of one (medians over the repeats)."""

    label: str
    """"TRIM" or "full" (all 576 patches)."""
    visual_tokens: int
    """Visual tokens the LLM saw (kept + aggregate, or 576)."""
    prompt_tokens: int
    """Prompt length the LLM prefills: template + question + visual tokens."""
    encode_s: float
    """CLIP image + text forward and TRIM."""
    prefill_s: float
    """Projector, LLM prefill and the first token's logits: the LLM's time to first token."""
    decode_s_per_token: float
    """Mean time of each further token (KV cache in use)."""
    new_tokens: int
    """Tokens generated per run (eos does not stop a timed run)."""
    low_latency: bool = False
    """Timed on the low-latency path (static cache; CUDA graphs on CUDA) instead of eager."""

    @property
    def ttft_s(self) -> float:
        """Time to first token as a user sees it: encoding + prefill."""
        return self.encode_s + self.prefill_s


def device_name(device: torch.device) -> str:
    """What the measured rows were measured on: the GPU's name, or "CPU (<processor>)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine() or 'unknown'})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _time_once(answerer: Answerer, image: Image.Image, question: str, new_tokens: int,
               low_latency: bool) -> tuple[float, float, float, int, int]:
    device = answerer.device
    start = time.perf_counter()
    reduced = answerer.reduce([image], [question])
    _sync(device)
    encoded = time.perf_counter()
    batch = answerer._batch([question], reduced.tokens)
    embeds, mask, _ = answerer.model.splice(batch)
    if low_latency:
        generator = answerer.low_latency_generator(new_tokens)
        generator.prefill(embeds[0])  # reads the token back: synchronised
        first = time.perf_counter()
        for _ in range(new_tokens - 1):  # every step, eos or not
            generator.step()
    else:
        llm = answerer.model.llm
        out = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(device)
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            # Greedy, whatever the token: timing needs every step, so eos does not stop it.
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = llm(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(device)
    done = time.perf_counter()
    decode = (done - first) / (new_tokens - 1) if new_tokens > 1 else 0.0
    return encoded - start, first - encoded, decode, int(reduced.tokens[0].shape[0]), int(embeds.shape[1])


def timed_generation(answerer: Answerer, image: Image.Image, question: str, new_tokens: int = 16, repeats: int = 3,
                     warmup: int = 1, low_latency: bool = False) -> list[TimedRun]:
    """Time a batch of one with the answerer's TRIM config ("TRIM") and with all patches ("full":
    the same config with selection="all"): CLIP + TRIM, prefill + first token, and each further
    token, as medians over `repeats` runs after `warmup` untimed ones; eager, or on the low-latency
    path (its graphs are captured in the first run: keep warmup >= 1 on CUDA). Returns [TRIM, full]."""
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need new_tokens >= 1, repeats >= 1, warmup >= 0; got {new_tokens}, {repeats}, {warmup}")
    runs = []
    for label, cfg in (("TRIM", answerer.trim_cfg), ("full", dataclasses.replace(answerer.trim_cfg, selection="all"))):
        timed = answerer.with_trim(cfg)
        for _ in range(warmup):
            _time_once(timed, image, question, new_tokens, low_latency)
        samples = [_time_once(timed, image, question, new_tokens, low_latency) for _ in range(repeats)]
        encode, prefill, decode = (statistics.median(s[i] for s in samples) for i in range(3))
        runs.append(TimedRun(label=label, visual_tokens=samples[0][3], prompt_tokens=samples[0][4], encode_s=encode,
                             prefill_s=prefill, decode_s_per_token=decode, new_tokens=new_tokens,
                             low_latency=low_latency))
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
