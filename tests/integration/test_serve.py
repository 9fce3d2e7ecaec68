"""The serving app on a real local Ray Serve (127.0.0.1), driven by the official `openai` client: the
answers of Answerer.answer for the same inputs, streamed and not; concurrent requests batched;
every bad request refused with an OpenAI error object before it reaches the model, and the next
good one answered; overload answered 503 with Retry-After. One app is started for the module."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

from tests.integration.conftest import REPO
from trim import TrimConfig

MODEL = "tiny-serve"
MAX_PENDING = 24
CONFIG = {"model_name": MODEL, "max_tokens_limit": 32, "default_max_tokens": 4, "max_prompt_chars": 200,
          "max_image_bytes": 200_000, "max_image_pixels": 1024 * 1024, "max_batch_size": 16,
          "batch_wait_timeout_s": 0.1, "max_pending": MAX_PENDING}
QUESTIONS = ["What is the colour of the square?", "Where is the circle?", "What shape is red?",
             "Describe the picture.", "Is there a triangle?", "How many shapes are there?",
             "What colour is the background?", "Which shape is largest?"]


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (int(rng.integers(120, 400)), int(rng.integers(120, 400))), tuple(rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, image.width - 40)), int(rng.integers(0, image.height - 40))
        draw.rectangle([x, y, x + 40, y + 40], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def data_url(image: Image.Image | bytes, media: str = "image/png") -> str:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return f"data:{media};base64,{base64.b64encode(image).decode()}"


def message(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, its data a few bytes: a decompression bomb's
    shape (judged from the header, it must be refused before any decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_models):
    from trim.formats import load_llava_trim

    torch.manual_seed(0)
    settings = {"trim": TrimConfig().to_dict(), "encoder": {"path": str(tiny_models.clip), "layer": -2}}
    model = load_llava_trim(tiny_models.llm, feature_dim=64, settings=settings)
    out = tmp_path_factory.mktemp("serve-model") / "model"
    model.save(out, tokenizer=AutoTokenizer.from_pretrained(str(tiny_models.llm)))
    return out


@pytest.fixture(scope="module")
def server(model_dir):
    import ray
    from ray import serve

    from pipelines.ray_cluster import init_ray
    from pipelines.serve.app import build
    from pipelines.serve.config import ServeConfig

    # The local cluster's workers inherit this environment: they import this checkout's packages.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0}, "autoscaling_config": None, "num_replicas": 1}
    options = {"Frontend": small, "Preparer": small, "Model": {**small, "max_ongoing_requests": 32}}
    handle = serve.run(build(ServeConfig(model_dir=str(model_dir), **CONFIG), options), name="trim-llava")
    yield {"url": f"http://127.0.0.1:{port}", "handle": handle}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def answerer(model_dir):
    from trim.inference import Answerer

    return Answerer.load(model_dir, device="cpu")


def model_stats(server) -> dict:
    import urllib.request

    with urllib.request.urlopen(server["url"] + "/health", timeout=30) as response:
        return json.loads(response.read())


def test_models_and_health(server, client):
    names = [m.id for m in client.models.list().data]
    assert names[0] == MODEL and f"{MODEL}:full" in names
    health = model_stats(server)
    assert health["status"] == "ok" and health["device"] == "cpu"


@pytest.mark.parametrize("setting", ["", ":full"])
def test_chat_answers_what_the_answerer_answers(client, answerer, setting):
    image, question = picture(1), QUESTIONS[0]
    expected_answerer = answerer if not setting else answerer.with_trim(TrimConfig.from_dict(
        {**answerer.trim_cfg.to_dict(), "selection": "all"}))
    expected = expected_answerer.answer([image], [question], max_new_tokens=6)[0]
    reply = client.chat.completions.create(model=MODEL + setting, messages=message(question, data_url(image)),
                                           max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    trim = reply.model_extra["trim"]
    assert trim["visual_tokens"] == expected.num_visual_tokens and trim["kept_patches"] == expected.num_kept
    assert trim["setting"] == ("full" if setting else "model")
    assert (trim["visual_tokens"] == 576) == bool(setting)

    stream = client.chat.completions.create(model=MODEL + setting, messages=message(question, data_url(image)),
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.usage.completion_tokens == len(expected.token_ids)
    assert last.model_extra["trim"]["visual_tokens"] == expected.num_visual_tokens


def test_sixteen_concurrent_requests_are_batched_and_answered_as_alone(client, answerer):
    pairs = [(picture(10 + i), QUESTIONS[i % len(QUESTIONS)]) for i in range(16)]
    expected = [answerer.answer([image], [question], max_new_tokens=4)[0] for image, question in pairs]

    def ask(pair):
        image, question = pair
        return client.chat.completions.create(model=MODEL, messages=message(question, data_url(image)),
                                              max_tokens=4, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, pairs))
    assert [r.choices[0].message.content for r in replies] == [e.text for e in expected]
    assert [r.model_extra["trim"]["visual_tokens"] for r in replies] == [e.num_visual_tokens for e in expected]
    assert max(r.model_extra["trim"]["batch_size"] for r in replies) > 1


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def big_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 7).save(buffer, "PNG")
    return buffer.getvalue()




def bad_requests():
    """(name, keyword arguments of create, expected status, expected error code)."""
    good = data_url(picture(0))
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good}},
                                        {"type": "image_url", "image_url": {"url": good}},
                                        {"type": "text", "text": "Compare them."}]}]
    return [
        ("two images", {"messages": two}, 400, "too_many_images"),
        ("over the pixel limit", {"messages": message("Q?", data_url(big_png(1500)))}, 400, "image_too_large"),
        ("decompression bomb", {"messages": message("Q?", data_url(png_header_only(100_000, 100_000)))}, 400,
         "image_too_large"),
        ("over the byte limit", {"messages": message("Q?", data_url(noise_png(300)))}, 400, "image_too_large"),
        ("not an image", {"messages": message("Q?", data_url(b"hello, not an image at all"))}, 400, "invalid_image"),
        ("truncated image", {"messages": message("Q?", data_url(noise_png(64)[:400]))}, 400, "invalid_image"),
        ("bad base64", {"messages": message("Q?", "data:image/png;base64,%%%not*base64%%%")}, 400,
         "invalid_image_url"),
        ("bad url", {"messages": message("Q?", "ftp://example.com/a.png")}, 400, "invalid_image_url"),
        ("disallowed host", {"messages": message("Q?", "https://example.com/cat.png")}, 400,
         "image_host_not_allowed"),
        ("disallowed bucket", {"messages": message("Q?", "s3://someone-elses-bucket/cat.png")}, 400,
         "image_host_not_allowed"),
        ("empty prompt", {"messages": message("   ", good)}, 400, "empty_prompt"),
        ("over-long prompt", {"messages": message("why " * 100, good)}, 400, "context_length_exceeded"),
        ("max_tokens 0", {"messages": message("Q?", good), "max_tokens": 0}, 400, "invalid_value"),
        ("max_tokens too many", {"messages": message("Q?", good), "max_tokens": 10_000}, 400, "invalid_value"),
        ("unknown part type", {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            {"type": "text", "text": "Q?"}]}]}, 400, "unsupported_content_type"),
        ("unknown model", {"messages": message("Q?", good), "model": "gpt-4o"}, 404, "model_not_found"),
        ("sampling", {"messages": message("Q?", good), "temperature": 0.7}, 400, "unsupported_value"),
    ]


@pytest.mark.parametrize("name,kwargs,status,code", bad_requests(), ids=[b[0] for b in bad_requests()])
def test_bad_request_is_refused_before_the_model_and_the_next_is_answered(server, client, name, kwargs, status, code):
    before = model_stats(server)["rows"]
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(**{"model": MODEL, "max_tokens": 2, **kwargs})
    assert raised.value.status_code == status, raised.value
    error = raised.value.body
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert model_stats(server)["rows"] == before  # it never reached the model replica
    reply = client.chat.completions.create(model=MODEL, messages=message(QUESTIONS[1], data_url(picture(2))),
                                           max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert model_stats(server)["rows"] == before + 1


def test_malformed_json_is_a_400_error_object(server):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    assert json.loads(raised.value.read())["error"]["code"] == "invalid_json"


def test_overload_is_answered_503_with_retry_after_and_service_goes_on(server, client):
    import urllib.error
    import urllib.request

    body = json.dumps({"model": MODEL, "messages": message(QUESTIONS[2], data_url(picture(3))), "max_tokens": 4})

    def post(_) -> tuple[int, dict, dict]:
        request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read())

    with ThreadPoolExecutor(3 * MAX_PENDING) as pool:
        responses = list(pool.map(post, range(3 * MAX_PENDING)))
    statuses = [status for status, _, _ in responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= MAX_PENDING // 2
    _, headers, error = next(r for r in responses if r[0] == 503)
    assert int(headers["retry-after"]) >= 1
    assert error["error"]["code"] == "server_overloaded" and error["error"]["type"] == "server_error"
    answered = next(answer for status, _, answer in responses if status == 200)
    reply = client.chat.completions.create(model=MODEL, messages=message(QUESTIONS[2], data_url(picture(3))),
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == answered["choices"][0]["message"]["content"]


def test_a_registered_model_in_mlflow_is_served_as_its_directory(model_dir, tmp_path, monkeypatch, answerer):
    """models:/<name>/<version> resolves through a real MLflow server to the model the fine-tuning job
    registered (Tracker.log_model's layout: the run's `model` artifact), and answers as the directory."""
    from mlflow import MlflowClient

    from pipelines.serve.engine import Engine
    from pipelines.serve.source import local_model
    from tests.integration import servers

    with servers.mlflow_server(tmp_path) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("serve-registry")).info.run_id
        client.log_artifacts(run, str(model_dir), "model")
        client.create_registered_model("trim-llava-tiny")
        version = client.create_model_version("trim-llava-tiny", source=f"runs:/{run}/model", run_id=run).version
        with local_model(f"models:/trim-llava-tiny/{version}") as local:
            files = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
            assert files == sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
        engine = Engine(f"models:/trim-llava-tiny/{version}")
    image, question = picture(5), QUESTIONS[3]
    expected = answerer.answer([image], [question], max_new_tokens=4)[0]
    got = engine.answerer.answer([image], [question], max_new_tokens=4)[0]
    assert got.text == expected.text and got.num_visual_tokens == expected.num_visual_tokens
