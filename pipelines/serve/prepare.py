"""The CPU side of a request: its image fetched, checked, decoded, padded to square and resized to
8-bit pixels (LLaVA's preprocessing up to CLIP's normalization, which the model replica does), and
its question tokenized (the TRIM scoring text for CLIP, the prompt for the LLM), as evaluation's CPU
stage does. What comes out is all the model replica needs: it runs CLIP, TRIM and generation only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipelines.serve.api import ApiError, ChatRequest
from pipelines.serve.config import ServeConfig
from pipelines.serve.images import decode, image_bytes
from pipelines.serve.source import local_model, model_settings, recorded_clip_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
"""Files the CPU side never needs (it reads configs, processors and tokenizers only)."""


class Preparation:
    """ChatRequest -> the model replica's row (pixels, token ids); loads the CLIP processor and
    tokenizer and the LLM tokenizer once (local copies of their files, weights left out)."""

    def __init__(self, cfg: ServeConfig):
        from transformers import CLIPConfig

        from trim import TrimConfig
        from trim.encoders import ClipHost
        from trim.llm_tokenizer import load_llm_tokenizer

        self.cfg = cfg
        with local_model(cfg.model_dir, skip_suffixes=WEIGHT_SUFFIXES) as model_dir:
            settings = model_settings(model_dir)
            clip_path = cfg.clip_path or recorded_clip_path(model_dir, cfg.model_dir)
            with local_model(clip_path, skip_suffixes=WEIGHT_SUFFIXES) as clip:
                self.host, self.tokenizer = ClipHost(clip), load_llm_tokenizer(Path(model_dir) / "llm")
                vision: Any = CLIPConfig.from_pretrained(clip).vision_config
        self.patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        trim = TrimConfig.from_dict(settings["trim"]) if "trim" in settings else TrimConfig()
        self.text_mode = trim.text_at_inference

    def prepare(self, request: ChatRequest) -> dict[str, Any]:
        """{"pixels": uint8 [3, H, W] numpy, "inputs": QuestionInputs as a dict, "question", "trim",
        "max_tokens"}; raises ApiError for an image or prompt over a limit."""
        from trim.inference import question_inputs

        image = decode(image_bytes(request.image, self.cfg), self.cfg)
        inputs = question_inputs(self.host, self.tokenizer, [request.question], self.text_mode)[0]  # type: ignore[arg-type]
        longest = len(inputs.prompt_ids) - 1 + self.patches + 1  # every patch kept, and TRIM's aggregate
        if longest > self.cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt would take up to {longest} tokens with its image, over the limit of "
                           f"{self.cfg.max_prompt_tokens}", "messages[0].content", "context_length_exceeded")
        pixels = self.host.prepare([image])[0].numpy()
        return {"pixels": pixels, "inputs": dataclasses.asdict(inputs), "question": request.question,
                "trim": request.trim, "max_tokens": request.max_tokens}
