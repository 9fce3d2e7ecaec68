"""The RayService that serves a model (infra/k8s/serve/rayservice.yaml), checked offline: it
validates against KubeRay's RayService schema and the operator's rules (test_k8s_manifests runs
every manifest through the same checks), its Serve config is one the app reads (its args a
ServeConfig, its deployments the app's), and broken copies fail."""

from __future__ import annotations

import pytest
import yaml

from . import k8s_schemas as sch
from . import k8s_support as ks

SERVICE = "serve/rayservice.yaml"


def serve_config(obj: dict) -> dict:
    return yaml.safe_load(obj["spec"]["serveConfigV2"])


def test_the_rayservice_validates():
    obj = ks.load(SERVICE)
    assert obj["kind"] == "RayService" and sch.validation_errors(obj) == []


def test_its_serve_config_is_one_the_app_reads():
    from pipelines.serve.config import ServeConfig

    (app,) = serve_config(ks.load(SERVICE))["applications"]
    assert app["import_path"] == "pipelines.serve.app:app_builder"
    cfg = ServeConfig.from_dict(app["args"])
    assert cfg.model_dir.startswith("models:/") and not cfg.allowed_hosts and not cfg.allowed_buckets
    names = {d["name"] for d in app["deployments"]}
    assert names == {"Frontend", "Preparer", "Model"}
    model = next(d for d in app["deployments"] if d["name"] == "Model")
    assert model["ray_actor_options"]["num_gpus"] == 1 and model["max_queued_requests"] > 0
    frontend = next(d for d in app["deployments"] if d["name"] == "Frontend")
    assert frontend["max_ongoing_requests"] > cfg.max_pending  # the Frontend answers 503 itself first


def test_the_tiny_serve_config_is_one_the_app_reads():
    from pipelines.serve.config import ServeConfig

    spec = yaml.safe_load((ks.REPO / "infra" / "serve" / "tiny.yaml").read_text())
    (app,) = spec["applications"]
    cfg = ServeConfig.from_dict(app["args"])
    assert spec["http_options"]["host"] == "127.0.0.1" and not cfg.allowed_hosts
    assert {d["name"] for d in app["deployments"]} == {"Frontend", "Preparer", "Model"}


BROKEN = [
    ("spec.upgradeStrategy.type", "Rolling", "upgradeStrategy.type"),
    ("spec.rayClusterDeletionDelaySeconds", -1, "must not be negative"),
    ("spec.serveConfigV2", "applications: [{name: x}]", "import_path"),
    ("spec.serveConfigV2", "applications: [", "does not parse"),
    ("spec.rayClusterConfig.rayVersion", "2.9.0", "ray pin"),
    ("metadata.name", "trim-" + "s" * 43, "at most 47"),
    ("spec.rayClusterConfig.workerGroupSpecs.1.replicas", 9, "replicas outside"),
]


@pytest.mark.parametrize("field, value, expected", BROKEN, ids=[f for f, _, _ in BROKEN])
def test_a_value_kuberay_would_reject_fails(field, value, expected):
    obj = ks.load(SERVICE)
    ks.set_at(obj, field, value)
    errors = sch.validation_errors(obj)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("field, misspelled", [("spec.serveConfigV2", "serveConfigv2"),
                                               ("spec.rayClusterConfig.headGroupSpec", "headGroupSpecs"),
                                               ("spec.upgradeStrategy", "upgradeStratgy")])
def test_a_misspelled_field_fails(field, misspelled):
    obj = ks.load(SERVICE)
    ks.rename_at(obj, field, misspelled)
    errors = sch.validation_errors(obj)
    assert any(misspelled in e for e in errors), errors
