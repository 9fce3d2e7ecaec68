"""The model replica's core: a batch of prepared rows (pipelines.serve.prepare) answered by the
batched answerer the evaluation uses (trim.inference.Answerer): per TRIM setting in the batch, one
CLIP forward, one TRIM call and one batched generation, each row with its own visual-token count;
on CUDA through trim.low_latency (static KV cache, CUDA graphs).

A batch generates to its longest `max_tokens`; each row keeps its first `max_tokens` tokens, which
greedy decoding makes the answer it would get alone with that limit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.serve.source import local_model, recorded_clip_path
from trim.setting_names import named_setting

logger = logging.getLogger(__name__)


def text_pieces(tokenizer: Any, token_ids: Sequence[int], text: str) -> list[str]:
    """The answer's text cut where its tokens end (what a stream sends one chunk at a time); the
    pieces join to `text` exactly."""
    pieces: list[str] = []
    sent = ""
    for i in range(1, len(token_ids) + 1):
        prefix = tokenizer.decode(list(token_ids[:i]), skip_special_tokens=True).lstrip()
        if prefix.startswith(sent) and text.startswith(prefix) and len(prefix) > len(sent):
            pieces.append(prefix[len(sent):])
            sent = prefix
    if sent != text:
        pieces.append(text[len(sent):])
    return pieces


class Engine:
    """An Answerer loaded once, answering batches of prepared rows."""

    def __init__(self, model_dir: str, clip_path: str = "", device: str = "", generation: str = "auto"):
        from trim.inference import Answerer

        with local_model(model_dir) as local:
            clip_path = clip_path or recorded_clip_path(local, model_dir)
            with local_model(clip_path) as clip:
                self.answerer = Answerer.load(local, clip, device=device or None)
        cuda = self.answerer.device.type == "cuda"
        self.low_latency = generation == "low_latency" or (generation == "auto" and cuda)
        self.patches = self.answerer.encoder.num_patches
        self._answerers = {"model": self.answerer}

    def answerer_for(self, name: str) -> Any:
        """The answerer of a TRIM setting name (the same model and generator, another TRIM config)."""
        if name not in self._answerers:
            self._answerers[name] = self.answerer.with_trim(named_setting(name, self.answerer.trim_cfg))
        return self._answerers[name]

    def answer(self, rows: Sequence[dict]) -> list[dict]:
        """Answers of prepared rows, in their order: text, token_ids, finish_reason, prompt_tokens,
        num_visual_tokens, num_kept, patches, trim, batch_size, text_pieces."""
        from trim.inference import QuestionInputs

        results: list[dict] = [{} for _ in rows]
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row["trim"], []).append(i)
        for name, members in groups.items():
            answerer = self.answerer_for(name)
            pixels = np.stack([rows[i]["pixels"] for i in members])
            answers = answerer.answer_prepared(pixels, [rows[i]["question"] for i in members],
                                               max_new_tokens=max(rows[i]["max_tokens"] for i in members),
                                               low_latency=self.low_latency,
                                               inputs=[QuestionInputs(**rows[i]["inputs"]) for i in members])
            for i, answer in zip(members, answers):
                limit = rows[i]["max_tokens"]
                ids = answer.token_ids[:limit]
                text = answer.text if len(ids) == len(answer.token_ids) else \
                    answerer.tokenizer.decode(ids, skip_special_tokens=True).strip()
                results[i] = {"text": text, "token_ids": ids, "finish_reason": "stop" if len(ids) < limit else "length",
                              "prompt_tokens": answer.prompt_tokens, "num_visual_tokens": answer.num_visual_tokens,
                              "num_kept": answer.num_kept, "patches": self.patches, "trim": name,
                              "batch_size": len(rows), "text_pieces": text_pieces(answerer.tokenizer, ids, text)}
        return results
