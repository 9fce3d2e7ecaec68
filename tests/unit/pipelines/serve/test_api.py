"""Request checks of the serving app (pipelines.serve.api): what is accepted, and what each refusal
says (status, OpenAI error fields)."""

from __future__ import annotations

import base64

import pytest

from pipelines.serve.api import ApiError, completion, model_names, parse_chat, stream_events, trim_choice
from pipelines.serve.config import ServeConfig

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def cfg(**kw) -> ServeConfig:
    return ServeConfig(model_dir="/models/m", model_name="m", max_tokens_limit=64, default_max_tokens=8,
                       max_prompt_chars=50, max_image_bytes=1000, **kw)


def body(content=None, **kw) -> dict:
    content = content if content is not None else [{"type": "image_url", "image_url": {"url": PNG}},
                                                   {"type": "text", "text": "What is it?"}]
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


def refused(data, config=None) -> ApiError:
    with pytest.raises(ApiError) as raised:
        parse_chat(data, config or cfg())
    return raised.value


def test_a_good_request_is_parsed_with_its_defaults():
    request = parse_chat(body(), cfg())
    assert request.question == "What is it?" and request.image.scheme == "data"
    assert request.image.media_type == "image/png" and request.max_tokens == 8 and not request.stream
    assert request.trim == "model" and request.model == "m"


def test_text_parts_are_joined_and_options_read():
    request = parse_chat(body([{"type": "text", "text": "What "}, {"type": "image_url", "image_url": {"url": PNG}},
                               {"type": "text", "text": " is it?"}], max_tokens=64, temperature=0, stream=True,
                              stream_options={"include_usage": True}), cfg())
    assert request.question == "What is it?" and request.max_tokens == 64 and request.stream and request.include_usage


@pytest.mark.parametrize("model,trim", [("m", "model"), ("m:full", "full"), ("m:paper", "paper"),
                                        ("m:ratio:0.1", "ratio:0.1"), ("m:official:0.05", "official:0.05")])
def test_a_trim_setting_is_asked_for_by_model_name(model, trim):
    assert parse_chat({**body(), "model": model}, cfg()).trim == trim


def test_a_trim_setting_may_come_as_an_extra_field():
    assert parse_chat(body(trim="full"), cfg()).trim == "full"
    assert refused(body(trim="none")).param == "trim"


@pytest.mark.parametrize("model", ["gpt-4o", "m:nothing", "m:ratio:2", "", None])
def test_an_unknown_model_is_a_404(model):
    err = refused({**body(), "model": model})
    assert err.status == (404 if model else 400) and err.param == "model"
    if model:
        assert err.code == "model_not_found" and model in err.message


def test_models_listed_are_all_accepted():
    for name in model_names(cfg()):
        parse_chat({**body(), "model": name}, cfg())


@pytest.mark.parametrize("content,code", [
    ([{"type": "image_url", "image_url": {"url": PNG}}] * 2 + [{"type": "text", "text": "Q"}], "too_many_images"),
    ([{"type": "input_audio", "input_audio": {}}, {"type": "text", "text": "Q"}], "unsupported_content_type"),
    ([{"type": "image_url", "image_url": {"url": PNG}}, {"type": "text", "text": "  "}], "empty_prompt"),
    ([{"type": "image_url", "image_url": {"url": PNG}}, {"type": "text", "text": "x" * 51}], "context_length_exceeded"),
    ("What is it?", "image_required"),
    ([], "invalid_type"),
    ([{"type": "text", "text": 3}], "invalid_type"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 2000}},
      {"type": "text", "text": "Q"}], "image_too_large"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain,hello"}}, {"type": "text", "text": "Q"}],
     "invalid_image_url"),
    ([{"type": "image_url", "image_url": {"url": "ftp://host/a.png"}}, {"type": "text", "text": "Q"}],
     "invalid_image_url"),
    ([{"type": "image_url", "image_url": {"url": "http://[::1"}}, {"type": "text", "text": "Q"}], "invalid_image_url"),
    ([{"type": "image_url", "image_url": {"url": "https://evil.example/a.png"}}, {"type": "text", "text": "Q"}],
     "image_host_not_allowed"),
    ([{"type": "image_url", "image_url": {"url": "s3://other/a.png"}}, {"type": "text", "text": "Q"}],
     "image_host_not_allowed"),
    ([{"type": "image_url", "image_url": {}}, {"type": "text", "text": "Q"}], "invalid_image_url"),
])
def test_bad_content_is_refused_with_a_400_naming_the_problem(content, code):
    err = refused(body(content))
    assert err.status == 400 and err.code == code and err.param.startswith("messages")
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_allowed_hosts_and_buckets_only():
    allowed = cfg(allowed_hosts=["images.example"], allowed_buckets=["pics"])
    for url, scheme in (("https://images.example/a.png", "https"), ("s3://pics/a/b.png", "s3")):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Q"}]
        assert parse_chat(body(content), allowed).image.scheme == scheme
    for url in ("https://images.example.evil/a.png", "https://sub.images.example/a.png", "s3://pics-2/a.png",
                "s3://pics/"):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Q"}]
        assert refused(body(content), allowed).status == 400


@pytest.mark.parametrize("extra,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 65}, "max_tokens"), ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_completion_tokens": 100}, "max_completion_tokens"),
    ({"temperature": 0.7}, "temperature"), ({"temperature": True}, "temperature"), ({"n": 2}, "n"),
    ({"top_p": 0.9}, "top_p"), ({"stream": "yes"}, "stream"),
])
def test_generation_settings_out_of_range_are_refused(extra, param):
    err = refused(body(**extra))
    assert err.status == 400 and err.param == param


@pytest.mark.parametrize("data", [[], "text", {"model": "m"}, {"model": "m", "messages": []},
                                  {"model": "m", "messages": [{"role": "system", "content": "x"}]},
                                  {"model": "m", "messages": [{"role": "user", "content": "a"}] * 2}])
def test_malformed_bodies_are_refused(data):
    assert refused(data).status == 400


def test_trim_choice():
    assert trim_choice("official") == "official"
    for bad in ("ratio:0", "ratio:x", "ratio:", "all", "official:1.5"):
        with pytest.raises(ValueError):
            trim_choice(bad)


def test_responses_carry_usage_and_the_trim_report():
    request = parse_chat(body(stream=True, stream_options={"include_usage": True}), cfg())
    result = {"text": "a red square", "token_ids": [5, 6, 7], "finish_reason": "stop", "prompt_tokens": 150,
              "num_visual_tokens": 120, "num_kept": 119, "patches": 576, "trim": "model", "batch_size": 3}
    reply = completion(request, result)
    assert reply["usage"] == {"prompt_tokens": 150, "completion_tokens": 3, "total_tokens": 153}
    assert reply["trim"] == {"setting": "model", "visual_tokens": 120, "kept_patches": 119, "patches": 576,
                             "batch_size": 3}
    events = stream_events(request, result, ["a", " red", " square"])
    assert events[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    import json

    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "a red square"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 3


def test_config_is_checked():
    with pytest.raises(ValueError):
        ServeConfig(model_dir="")
    with pytest.raises(ValueError):
        ServeConfig(model_dir="m", default_max_tokens=100, max_tokens_limit=10)
    with pytest.raises(ValueError, match="unknown settings"):
        ServeConfig.from_dict({"model_dir": "m", "max_tokens": 3})
