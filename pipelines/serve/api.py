"""OpenAI's chat-completions API, the part this app speaks: requests checked into a ChatRequest,
errors as OpenAI's error object, responses and stream chunks built from an answer.

Pure (no Ray, no model): every check here runs in the front end, so a malformed request never
reaches the model replica. LLaVA-1.5 answers one question about one image: a request holds one user
message with one `image_url` part and its text parts (joined by spaces, as the export's chat template
joins them); greedy decoding only.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipelines.serve.config import ServeConfig

TRIM_CHOICES = ("model", "full", "default", "paper", "official")
"""TRIM settings a request may name (besides "ratio:<float>" and "official:<float>"): "model" is the
one the model was trained with, "full" every patch (no reduction)."""


class ApiError(Exception):
    """A request refused: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImageRef:
    """Where a request's image is: a data: URL's payload (base64 text) or a URL to fetch."""

    scheme: str
    """"data", "http", "https" or "s3"."""
    url: str
    """The whole URL."""
    media_type: str = ""
    """A data: URL's media type ("image/png")."""
    payload: str = ""
    """A data: URL's base64 text."""


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request."""

    question: str
    image: ImageRef
    max_tokens: int
    stream: bool
    include_usage: bool
    trim: str
    """The TRIM setting's name (TRIM_CHOICES, "ratio:<float>" or "official:<float>")."""
    model: str
    """The model name as the request gave it (echoed in the response)."""


def trim_choice(name: str) -> str:
    """A TRIM setting name, checked; raises ValueError for an unknown one."""
    if name in TRIM_CHOICES:
        return name
    prefix, _, number = name.partition(":")
    if prefix in ("ratio", "official") and number:
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if 0.0 < value <= 1.0:
            return name
    raise ValueError(f"unknown TRIM setting {name!r}: one of {', '.join(TRIM_CHOICES)}, "
                     "ratio:<0..1> or official:<0..1>")


def model_names(cfg: ServeConfig) -> list[str]:
    """The names GET /v1/models lists: the model, then the model under each named TRIM setting."""
    return [cfg.model_name] + [f"{cfg.model_name}:{name}" for name in TRIM_CHOICES if name != "model"]


def _model_trim(model: Any, cfg: ServeConfig) -> str:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` must be a non-empty string", "model", "invalid_type")
    name, sep, setting = model.partition(":")
    if name != cfg.model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{cfg.model_name}` "
                       f"(GET /v1/models lists its names)", "model", "model_not_found")
    if not sep:
        return cfg.default_trim
    try:
        return trim_choice(setting)
    except ValueError as err:
        raise ApiError(404, f"The model `{model}` does not exist: {err}", "model", "model_not_found") from None


def _image_ref(url: Any, where: str, cfg: ServeConfig) -> ImageRef:
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}.url must be a non-empty string", f"{where}.url", "invalid_image_url")
    if url.startswith("data:"):
        match = re.fullmatch(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,;]*=[^,;]*)*;base64,(.*)", url, re.S)
        if not match:
            raise ApiError(400, f"{where}.url is a data: URL but not `data:image/<type>;base64,<data>`",
                           f"{where}.url", "invalid_image_url")
        if len(match.group(3)) > (cfg.max_image_bytes + 2) // 3 * 4 + 4:
            raise ApiError(400, f"the image in {where}.url is over the limit of {cfg.max_image_bytes} bytes",
                           f"{where}.url", "image_too_large")
        return ImageRef("data", url[:64], match.group(1) or "", match.group(3))
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as err:
        raise ApiError(400, f"{where}.url is not a valid URL: {err}", f"{where}.url", "invalid_image_url") from None
    if parts.scheme in ("http", "https"):
        if not host:
            raise ApiError(400, f"{where}.url has no host", f"{where}.url", "invalid_image_url")
        if host not in cfg.allowed_hosts:
            raise ApiError(400, f"images from host {host!r} are not allowed on this server"
                           + ("" if cfg.allowed_hosts else " (it takes data: URLs only)"),
                           f"{where}.url", "image_host_not_allowed")
        return ImageRef(parts.scheme, url)
    if parts.scheme == "s3":
        if not parts.netloc or parts.netloc not in cfg.allowed_buckets or not parts.path.strip("/"):
            raise ApiError(400, f"images from s3://{parts.netloc} are not allowed on this server"
                           if parts.netloc else f"{where}.url names no bucket", f"{where}.url",
                           "image_host_not_allowed")
        return ImageRef("s3", url)
    raise ApiError(400, f"{where}.url has scheme {parts.scheme!r}: data:, http(s):// or s3:// URLs only",
                   f"{where}.url", "invalid_image_url")


def _content(content: Any, cfg: ServeConfig) -> tuple[str, ImageRef | None]:
    where = "messages[0].content"
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"{where} must be a string or a non-empty list of parts", where, "invalid_type")
    texts: list[str] = []
    images: list[ImageRef] = []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{here}.text must be a string", f"{here}.text", "invalid_type")
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image_ref(part.get("image_url"), f"{here}.image_url", cfg))
            if len(images) > 1:
                raise ApiError(400, "a request may hold one image (LLaVA-1.5 takes one); this one holds more",
                               here, "too_many_images")
        else:
            raise ApiError(400, f"{here} has content part type {kind!r}: `text` and `image_url` only",
                           f"{here}.type", "unsupported_content_type")
    return " ".join(t.strip() for t in texts if t.strip()), images[0] if images else None


def _int_in(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"`{name}` must be an integer from {low} to {high}, got {value!r}", name, "invalid_value")
    return value


def parse_chat(body: Any, cfg: ServeConfig) -> ChatRequest:
    """A chat-completions request body (parsed JSON) checked into a ChatRequest; raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    trim = _model_trim(body.get("model"), cfg)
    if "trim" in body:  # the TRIM setting may also come as an extra field (the openai client's extra_body)
        try:
            trim = trim_choice(body["trim"]) if isinstance(body["trim"], str) else trim_choice(repr(body["trim"]))
        except ValueError as err:
            raise ApiError(400, str(err), "trim", "invalid_value") from None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", "messages", "invalid_type")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ApiError(400, "`messages` must hold exactly one message, from the user (this model answers one "
                       "question about one image with LLaVA-1.5's own system prompt)", "messages", "invalid_value")
    question, image = _content(messages[0].get("content"), cfg)
    if not question.strip():
        raise ApiError(400, "the prompt is empty: give the question as text", "messages[0].content", "empty_prompt")
    if len(question) > cfg.max_prompt_chars:
        raise ApiError(400, f"the prompt has {len(question)} characters, over the limit of {cfg.max_prompt_chars}",
                       "messages[0].content", "context_length_exceeded")
    if image is None:
        raise ApiError(400, "the message holds no image: add one `image_url` part", "messages[0].content",
                       "image_required")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = cfg.default_max_tokens if max_tokens is None else _int_in(max_tokens, name, 1, cfg.max_tokens_limit)
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or temperature != 0):
        raise ApiError(400, f"`temperature` must be 0 (greedy decoding; sampling is not served), got {temperature!r}",
                       "temperature", "unsupported_value")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "`n` must be 1", "n", "unsupported_value")
    if body.get("top_p") not in (None, 1, 1.0):
        raise ApiError(400, "`top_p` must be 1 (greedy decoding)", "top_p", "unsupported_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return ChatRequest(question=question, image=image, max_tokens=max_tokens, stream=stream,
                       include_usage=include_usage, trim=trim, model=body["model"])


# Responses ------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: dict) -> dict[str, int]:
    """OpenAI's usage: the prompt counts the visual tokens the LLM saw."""
    prompt, completion = int(result["prompt_tokens"]), len(result["token_ids"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def trim_report(result: dict) -> dict[str, Any]:
    """What TRIM did, beside `usage`: the setting, the visual tokens the LLM saw (kept patches + the
    aggregate; 576 without TRIM), the patches kept and of how many, and the batch answered in."""
    return {"setting": result["trim"], "visual_tokens": result["num_visual_tokens"],
            "kept_patches": result["num_kept"], "patches": result["patches"], "batch_size": result["batch_size"]}


def completion(request: ChatRequest, result: dict, created: int | None = None) -> dict[str, Any]:
    """The chat.completion object of an answer (result: the model replica's row)."""
    return {"id": completion_id(), "object": "chat.completion", "created": created or int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": None, "finish_reason": result["finish_reason"]}],
            "usage": usage(result), "trim": trim_report(result)}


def stream_events(request: ChatRequest, result: dict, pieces: list[str]) -> list[str]:
    """The server-sent events of an answer: a role chunk, one chunk per piece of text, a final chunk
    with the finish reason and the TRIM report (and `usage` when stream_options.include_usage), then
    `[DONE]`."""
    ident, created = completion_id(), int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": request.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in pieces if piece]
    extra: dict[str, Any] = {"trim": trim_report(result)}
    if request.include_usage:
        extra["usage"] = usage(result)
    events.append(chunk({}, result["finish_reason"], **extra))
    return events + ["data: [DONE]\n\n"]
