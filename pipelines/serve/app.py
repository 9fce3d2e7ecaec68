"""The Ray Serve application: three deployments.

- `Frontend` (the HTTP ingress, FastAPI): checks each request (pipelines.serve.api), bounds the
  requests it holds (more are answered 503 with Retry-After), hands the image to a Preparer and the
  prepared row to the model, and answers as JSON or server-sent events.
- `Preparer` (CPU): fetches, checks, decodes, pads and resizes the image and tokenizes the question
  (pipelines.serve.prepare). Bad images are refused here: nothing malformed reaches the model.
- `Model` (the GPU replica): `serve.batch` gathers concurrent requests into one batch, answered
  by pipelines.serve.engine.Engine (CLIP + TRIM + generation, each row its own visual-token count)
  in a worker thread, so the next batch forms while one runs. Its queue is bounded
  (max_ongoing_requests, max_queued_requests): a full queue comes back to the Frontend as Ray
  Serve's BackPressureError, answered 503.

    app = build(ServeConfig(model_dir="runs/tiny/checkpoints/tiny/model"))
    serve.run(app)                      # or a Serve config file: import_path pipelines.serve.app:app_builder
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime.
import asyncio
import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from pipelines.serve.api import ApiError, ChatRequest, completion, model_names, parse_chat, stream_events
from pipelines.serve.config import ServeConfig

logger = logging.getLogger(__name__)

api = FastAPI(title="TRIM-LLaVA", description="OpenAI-compatible chat completions with TRIM token reduction")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4})
class Preparer:
    """Images decoded, padded and resized, questions tokenized, on CPUs."""

    def __init__(self, cfg: dict):
        from pipelines.serve.prepare import Preparation

        config = ServeConfig.from_dict(cfg)
        self.core = Preparation(config)
        # Decoding and resizing release the GIL: a few requests are prepared at once per replica.
        self.workers = ThreadPoolExecutor(max_workers=config.prepare_threads, thread_name_prefix="prepare")

    async def __call__(self, request: ChatRequest) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.workers, self._prepare, request)

    def _prepare(self, request: ChatRequest) -> dict:
        try:
            return {"row": self.core.prepare(request)}
        except ApiError as err:  # returned, not raised: the Frontend answers it as it is
            return {"status": err.status, "error": err.body()}


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64)
class Model:
    """The model replica: batches of prepared rows through the Engine."""

    def __init__(self, cfg: dict):
        from pipelines.serve.engine import Engine

        config = ServeConfig.from_dict(cfg)
        self.engine = Engine(config.model_dir, config.clip_path, config.device, config.generation)
        batching: Any = self.answer_batch  # serve.batch's wrapper (its setters are not in its type)
        batching.set_max_batch_size(config.max_batch_size)
        batching.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.batches = self.rows = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="answer")  # one batch on the device at once

    async def __call__(self, row: dict) -> dict:
        return await self.answer_batch(row)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def answer_batch(self, rows: list[dict]) -> list[dict]:
        results = await asyncio.get_running_loop().run_in_executor(self.worker, self.engine.answer, rows)
        self.batches += 1
        self.rows += len(rows)
        return results

    def health(self) -> dict:
        """The device, the generation path, torch's CPU threads, and the batches and rows this replica
        answered."""
        import torch

        return {"device": str(self.engine.answerer.device), "low_latency": self.engine.low_latency,
                "torch_threads": torch.get_num_threads(), "batches": self.batches, "rows": self.rows}


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@serve.deployment(max_ongoing_requests=256, max_queued_requests=256,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})
@serve.ingress(api)
class Frontend:
    """The HTTP routes: POST /v1/chat/completions, GET /v1/models, GET /health."""

    def __init__(self, preparer: Any, model: Any, cfg: dict):
        self.preparer, self.model = preparer, model
        self.cfg = ServeConfig.from_dict(cfg)
        self.pending = 0

    def _busy(self, why: str) -> ApiError:
        return ApiError(503, f"the server is busy ({why}); retry after {self.cfg.retry_after_s} s", None,
                        "server_overloaded", type="server_error", headers={"Retry-After": str(self.cfg.retry_after_s)})

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.cfg.model_name, **await self.model.health.remote()})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "trim-llava"}
                for name in model_names(self.cfg)]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            return _error(ApiError(400, f"the request body is not valid JSON: {err}", None, "invalid_json"))
        try:
            chat = parse_chat(body, self.cfg)
        except ApiError as err:
            return _error(err)
        if self.pending >= self.cfg.max_pending:
            return _error(self._busy(f"{self.pending} requests in flight on this replica"))
        self.pending += 1
        try:
            prepared = await self.preparer.remote(chat)
            if "error" in prepared:
                return JSONResponse(prepared["error"], status_code=prepared["status"])
            result = await self.model.remote(prepared["row"])
        except BackPressureError:
            return _error(self._busy("the model's queue is full"))
        except Exception as err:  # a replica that died or failed: an error object, and the next request goes on
            logger.exception("answering a request failed")
            return _error(ApiError(500, f"the server failed to answer: {type(err).__name__}", None, "internal_error",
                                   type="server_error"))
        finally:
            self.pending -= 1
        if chat.stream:
            return StreamingResponse(iter(stream_events(chat, result, result["text_pieces"])),
                                     media_type="text/event-stream")
        return JSONResponse(completion(chat, result))


def build(cfg: ServeConfig, options: dict[str, dict] | None = None) -> serve.Application:
    """The application for a config; options: per deployment ("Frontend", "Preparer", "Model"), the
    `.options()` to override (a Serve config file's `deployments` section does the same)."""
    options = options or {}
    deployments: dict[str, Any] = {"Model": Model, "Preparer": Preparer, "Frontend": Frontend}
    unknown = sorted(set(options) - set(deployments))
    if unknown:
        raise ValueError(f"serve: options for unknown deployments {unknown}; the deployments: {sorted(deployments)}")
    made = {name: d.options(**options.get(name, {})) for name, d in deployments.items()}
    args = dataclasses.asdict(cfg)
    return made["Frontend"].bind(made["Preparer"].bind(args), made["Model"].bind(args), args)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The builder a Serve config file names (`import_path: pipelines.serve.app:app_builder`): its
    application `args` are ServeConfig's fields."""
    return build(ServeConfig.from_dict(dict(args)))
