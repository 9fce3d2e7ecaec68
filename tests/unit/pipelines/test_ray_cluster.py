"""What the Ray workers are given: settings, never secrets; blanking secrets in text (pipelines.redaction);
Ray's own console lines at WARNING unless asked for."""

import logging

from pipelines.ray_cluster import forwarded_env, ray_log_level, worker_env
from pipelines.redaction import SECRET_ENV, redact, redact_uri

SENTINEL = "sentinel-51b2e0-secret"

DRIVER_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SENTINEL, "AWS_SESSION_TOKEN": SENTINEL,
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
    "MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "MLFLOW_TRACKING_PASSWORD": SENTINEL,
    "HF_TOKEN": SENTINEL, "RAY_AUTH_TOKEN": SENTINEL, "PATH": "/usr/bin",
}


def test_workers_get_the_settings_and_no_credential():
    env = forwarded_env(DRIVER_ENV)
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                   "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    assert SENTINEL not in repr(env)


def test_a_tracking_uri_with_credentials_is_not_forwarded_and_the_warning_hides_them(caplog):
    driver = {"MLFLOW_TRACKING_URI": f"https://alice:{SENTINEL}@mlflow.example", "AWS_REGION": "us-east-1"}
    with caplog.at_level(logging.WARNING, logger="pipelines.ray_cluster"):
        assert forwarded_env(driver) == {"AWS_REGION": "us-east-1"}
    (record,) = caplog.records
    assert "https://***@mlflow.example" in record.getMessage() and SENTINEL not in record.getMessage()


def test_redact_blanks_credentials_in_uris_and_the_values_of_secret_variables():
    assert redact_uri("s3://bucket/x and https://u:p@host:5000/api") == "s3://bucket/x and https://***@host:5000/api"
    assert redact_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"
    environ = {name: SENTINEL for name in SECRET_ENV} | {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "HF_TOKEN": "ab"}
    assert redact(f"key={SENTINEL};", environ) == "key=***;"
    assert redact("lab-ab", environ) == "lab-ab"  # values too short to be a secret are left alone
    nested = {"a": [f"x{SENTINEL}", 3], "b": {"c": "sqlite:////runs/mlflow.db"}, "d": None}
    assert redact(nested, environ) == {"a": ["x***", 3], "b": {"c": "sqlite:////runs/mlflow.db"}, "d": None}


def test_workers_get_huge_pages_for_large_cpu_tensors_unless_the_driver_says_otherwise():
    assert worker_env({"AWS_REGION": "us-east-1"}) == {"THP_MEM_ALLOC_ENABLE": "1", "AWS_REGION": "us-east-1"}
    assert worker_env({"THP_MEM_ALLOC_ENABLE": "0"})["THP_MEM_ALLOC_ENABLE"] == "0"


def test_rays_own_lines_are_at_warning_unless_asked_for():
    assert ray_log_level({}) == logging.WARNING
    assert ray_log_level({"TRIM_RAY_LOG_LEVEL": "info"}) == logging.INFO
    assert ray_log_level({"TRIM_RAY_LOG_LEVEL": "DEBUG"}) == logging.DEBUG
    assert ray_log_level({"TRIM_RAY_LOG_LEVEL": "chatty"}) == logging.WARNING  # not a level: the default


def test_progress_bars_where_asked_or_where_a_terminal_is_attached(monkeypatch):
    import io
    import sys

    from pipelines.ray_cluster import progress_bars

    assert progress_bars({"TRIM_PROGRESS": "1"}) and not progress_bars({"TRIM_PROGRESS": "0"})
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    assert not progress_bars({})


def test_each_line_names_its_stage_once(capsys):
    from pipelines.logs import setup_logging

    setup_logging()
    for name in ("pipelines.shard.stage", "pipelines.precompute.stage", "pipelines.shard.image_index"):
        logging.getLogger(name).info("hello")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["shard: hello", "precompute: hello", "image_index: hello"]
