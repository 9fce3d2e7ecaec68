"""Serving throughput: the Ray Serve app (pipelines/serve) on 127.0.0.1 with the tiny model, driven by
a bounded number of concurrent clients (the official `openai` client), TRIM and all 576 tokens side
by side, against `Answerer.answer` in-process on batches of the sizes the server formed.

    python benchmarks/bench_serve.py                # 96 questions per setting, 16 clients
    python benchmarks/bench_serve.py --quick        # 16 questions, 8 clients (a smoke run)

Each setting: a few warm-up requests, then every question once through the server (wall time from
the first request sent to the last answer); the batch sizes the model replica reports for each
request give the batches the in-process Answerer then answers (the same questions in the same
order, as many batches of each size). Throughput is questions per second; serve_over_answerer is
server throughput / Answerer throughput with TRIM (the cost of HTTP, decoding, queueing and batching
on top of the model's own work), the answerer given the model replica's CPU threads. Ends with one
line `RESULT {json}`: questions_per_s_trim, questions_per_s_full, serve_over_answerer,
serve_over_answerer_full, p50_latency_s, p95_latency_s (TRIM, per request, at the client),
mean_batch_size (TRIM), and the answerer's throughputs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import table  # noqa: E402

QUESTIONS = ["What is the colour of the square?", "Where is the circle?", "What shape is red?",
             "Describe the picture.", "Is there a triangle?", "How many shapes are there?"]


def pictures(count: int) -> list:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        image = Image.new("RGB", (int(rng.integers(200, 500)), int(rng.integers(200, 500))),
                          tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = int(rng.integers(0, image.width - 60)), int(rng.integers(0, image.height - 60))
            draw.ellipse([x, y, x + 60, y + 60], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        out.append(image)
    return out


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def tiny_model(root: str) -> str:
    """A model directory with the tiny models (a fresh projector: serving cost does not depend on it)."""
    import torch
    from transformers import AutoTokenizer

    from synthetic.tiny_models import build_tiny_models
    from trim import TrimConfig
    from trim.formats import load_llava_trim

    models = build_tiny_models(os.path.join(root, "models"))
    torch.manual_seed(0)
    settings = {"trim": TrimConfig().to_dict(), "encoder": {"path": str(models.clip), "layer": -2}}
    model = load_llava_trim(models.llm, feature_dim=64, settings=settings)
    out = os.path.join(root, "model")
    model.save(out, tokenizer=AutoTokenizer.from_pretrained(str(models.llm)))
    return out


def start_server(model_dir: str, name: str, batch: int) -> str:
    import socket

    from ray import serve

    from pipelines.ray_cluster import init_ray
    from pipelines.serve.app import build
    from pipelines.serve.config import ServeConfig

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    init_ray(num_cpus=os.cpu_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    one = {"ray_actor_options": {"num_cpus": 0}, "autoscaling_config": None, "num_replicas": 1}
    cfg = ServeConfig(model_dir=model_dir, model_name=name, max_batch_size=batch, batch_wait_timeout_s=0.01,
                      max_pending=256)
    serve.run(build(cfg, {"Frontend": one, "Preparer": {**one, "num_replicas": 2, "max_ongoing_requests": 16},
                          "Model": one}),
              name="bench")
    return f"http://127.0.0.1:{port}/v1"


def replica_threads(base_url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=60) as response:
        return int(json.loads(response.read())["torch_threads"])


def drive(client, model: str, urls: list[str], questions: list[str], clients: int, max_tokens: int):
    """(wall seconds, per-request latencies, replies) for every question once, `clients` at a time."""
    def ask(i: int):
        started = time.perf_counter()
        reply = client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i]}},
                                         {"type": "text", "text": questions[i]}]}])
        return time.perf_counter() - started, reply

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(ask, range(len(urls))))
    return time.perf_counter() - started, [d[0] for d in done], [d[1] for d in done]


def answerer_seconds(answerer, images, questions, sizes: Counter, max_tokens: int) -> tuple[float, list[str]]:
    """Answerer.answer over the questions in order, in batches of the sizes the server formed."""
    plan = [size for size, rows in sorted(sizes.items()) for _ in range(max(1, rows // size))]
    texts, start, seconds = [], 0, 0.0
    while start < len(images):
        size = plan[len(texts) % len(plan)] if plan else 1
        chunk = slice(start, min(start + size, len(images)))
        began = time.perf_counter()
        texts += [a.text for a in answerer.answer(images[chunk], questions[chunk], max_new_tokens=max_tokens)]
        seconds += time.perf_counter() - began
        start = chunk.stop
    return seconds, texts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 questions, 8 clients")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (as eval.max_new_tokens)")
    args = parser.parse_args(argv)
    count, clients = (16, 8) if args.quick else (args.questions, args.clients)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TRIM_PROGRESS"] = "0"

    import openai
    import ray
    import torch
    from ray import serve

    from trim import TrimConfig
    from trim.inference import Answerer

    name = "tiny"
    images = pictures(count)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    urls = [data_url(image) for image in images]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as root:
        model_dir = tiny_model(root)
        base_url = start_server(model_dir, name, batch=clients)
        try:
            client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
            # The in-process answerer runs with the model replica's CPU threads (Ray gives an actor as
            # many as it reserves CPUs, at least one): the same compute on both sides.
            torch.set_num_threads(replica_threads(base_url))
            answerer = Answerer.load(model_dir, device="cpu")
            full = answerer.with_trim(TrimConfig.from_dict({**answerer.trim_cfg.to_dict(), "selection": "all"}))
            rows, result = [], {}
            for label, model, local in (("trim", name, answerer), ("full", f"{name}:full", full)):
                drive(client, model, urls[:clients], questions[:clients], clients, args.max_tokens)  # warm-up
                wall, latencies, replies = drive(client, model, urls, questions, clients, args.max_tokens)
                sizes = Counter(r.model_extra["trim"]["batch_size"] for r in replies)
                local_s, texts = answerer_seconds(local, images, questions, sizes, args.max_tokens)
                agree = sum(t == r.choices[0].message.content for t, r in zip(texts, replies)) / count
                served, alone = count / wall, count / local_s
                batch = float(np.mean([r.model_extra["trim"]["batch_size"] for r in replies]))
                visual = float(np.mean([r.model_extra["trim"]["visual_tokens"] for r in replies]))
                rows.append([label, served, alone, served / alone, batch, visual,
                             float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95)), agree])
                result[f"questions_per_s_{label}"] = round(served, 3)
                result[f"answerer_questions_per_s_{label}"] = round(alone, 3)
                result["serve_over_answerer" + ("" if label == "trim" else "_full")] = round(served / alone, 3)
                if label == "trim":
                    result.update(p50_latency_s=round(float(np.percentile(latencies, 50)), 3),
                                  p95_latency_s=round(float(np.percentile(latencies, 95)), 3),
                                  mean_batch_size=round(batch, 2), mean_visual_tokens_trim=round(visual, 1),
                                  answers_agree_trim=round(agree, 3))
        finally:
            serve.shutdown()
            ray.shutdown()
    print(table(rows, ["setting", "served q/s", "answerer q/s", "ratio", "mean batch", "visual tokens",
                       "p50 s", "p95 s", "same text"]))
    result.update(questions=count, clients=clients, max_tokens=args.max_tokens)
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
