"""The CPU side of a request: its image fetched, checked, decoded, padded to square and resized to
8-bit pixels (LLaVA's preprocessing up to CLIP's normalization, which the model replica does), and
its question tokenized (the TRIM scoring text for CLIP, the prompt for the LLM), as evaluation's CPU
stage does. What comes out is all the model replica needs: it runs CLIP, TRIM and generation only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.serve.api import ApiError, ChatRequest
from pipelines.serve.config import ServeConfig
from pipelines.serve.images import decode, image_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
"""Files the CPU side never needs (it reads configs, processors and tokenizers only)."""


def recorded_clip_path(model_dir: str) -> str:
    """The CLIP checkpoint the model directory records (its settings' encoder path)."""
    from trim.model_files import SETTINGS_FILE

    settings = json.loads(storage.read_bytes(storage.join(model_dir, SETTINGS_FILE)))
    path = settings.get("encoder", {}).get("path")
    if not path:
        raise ValueError(f"{model_dir} records no CLIP path: set clip_path in the serve config")
    return path


def text_mode(model_dir: str) -> str:
    """The TRIM text mode at inference the model directory records (TrimConfig's default if none)."""
    from trim import TrimConfig
    from trim.model_files import SETTINGS_FILE

    settings = json.loads(storage.read_bytes(storage.join(model_dir, SETTINGS_FILE)))
    cfg = TrimConfig.from_dict(settings["trim"]) if "trim" in settings else TrimConfig()
    return cfg.text_at_inference


class Preparation:
    """ChatRequest -> the model replica's row (pixels, token ids); loads the CLIP processor and
    tokenizer and the LLM tokenizer once (local copies of their files, weights left out)."""

    def __init__(self, cfg: ServeConfig):
        from transformers import CLIPConfig

        from trim.encoders import ClipHost
        from trim.llm_tokenizer import load_llm_tokenizer

        self.cfg = cfg
        clip_path = cfg.clip_path or recorded_clip_path(cfg.model_dir)
        clip = storage.local_copy(clip_path, skip_suffixes=WEIGHT_SUFFIXES)
        llm_uri = storage.join(cfg.model_dir, "llm")
        llm = storage.local_copy(llm_uri, skip_suffixes=WEIGHT_SUFFIXES)
        try:
            self.host, self.tokenizer = ClipHost(clip), load_llm_tokenizer(llm)
            vision: Any = CLIPConfig.from_pretrained(clip).vision_config
            self.patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        finally:
            for local, uri in ((clip, clip_path), (llm, llm_uri)):
                if local != uri:  # a temporary copy of S3 files, read now
                    shutil.rmtree(Path(local), ignore_errors=True)
        self.text_mode = text_mode(cfg.model_dir)

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
