"""The serving app's settings: one typed config, read from the `args` of a Serve config file's
application (infra/serve/*.yaml) or built in Python (tests, the benchmark)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServeConfig:
    """What the app serves and the limits every request is held to before it reaches the model."""

    model_dir: str
    """The model to serve: a model directory (LlavaTrim.save's layout; local or s3://) or a version of
    a registered model in MLflow (`models:/<name>/<version>`, `models:/<name>@<alias>`)."""
    clip_path: str = ""
    """The CLIP checkpoint TRIM scores with; empty: the encoder path the model directory records."""
    model_name: str = "trim-llava"
    """The name clients pass as `model`. `<name>:<preset>` asks for another TRIM setting (see TRIM_CHOICES)."""
    default_trim: str = "model"
    """The TRIM setting of a request that names none: "model" (the one the model was trained with),
    "full" (all 576 tokens), or a preset name ("default", "paper", "official", "ratio:<float>")."""
    max_tokens_limit: int = 512
    """The largest `max_tokens` a request may ask for."""
    default_max_tokens: int = 64
    """`max_tokens` of a request that gives none."""
    max_prompt_chars: int = 4000
    """The longest question, in characters; longer ones are refused before tokenizing."""
    max_prompt_tokens: int = 1024
    """The longest LLM prompt, visual tokens included (576 at most), in tokens."""
    max_image_bytes: int = 10 * 2**20
    """The largest image file (a data: URL's decoded bytes or a download)."""
    max_image_pixels: int = 4096 * 4096
    """The most pixels an image may have, read from its header before it is decoded (decompression bombs)."""
    max_aspect_ratio: float = 20.0
    """The longest side over the shortest at most (LLaVA pads to a square of the long side)."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Hosts `http(s)://` image URLs may come from (exact names); none by default: data: URLs only."""
    allowed_buckets: list[str] = field(default_factory=list)
    """Buckets `s3://` image URLs may come from; none by default."""
    fetch_timeout_s: float = 10.0
    """Timeout of one image download."""
    prepare_threads: int = 4
    """Requests one Preparer replica decodes and resizes at once (in threads: PIL releases the GIL)."""
    max_batch_size: int = 16
    """Rows the model replica answers together at most."""
    batch_wait_timeout_s: float = 0.02
    """How long the model replica waits for a batch to fill once its first request is in."""
    max_pending: int = 64
    """Requests one front-end replica holds at once (being prepared or answered); more are answered
    503 with Retry-After."""
    retry_after_s: int = 1
    """The Retry-After of a 503."""
    device: str = ""
    """"cuda", "cpu", or empty: CUDA when the replica has a GPU."""
    generation: str = "auto"
    """"low_latency" (static KV cache, CUDA graphs on CUDA), "eager" (transformers' generate), or
    "auto": low_latency on CUDA, eager on the CPU."""

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("serve: model_dir is required")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(f"serve: default_max_tokens {self.default_max_tokens} is not in "
                             f"1..{self.max_tokens_limit}")
        if self.generation not in ("auto", "low_latency", "eager"):
            raise ValueError(f"serve: generation {self.generation!r} is not auto, low_latency or eager")
        if self.max_batch_size < 1 or self.max_pending < 1 or self.prepare_threads < 1:
            raise ValueError("serve: max_batch_size, max_pending and prepare_threads must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"serve: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**data)
