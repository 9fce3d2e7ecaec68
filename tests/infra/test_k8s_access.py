"""Who can reach the Ray cluster, checked offline (tests/infra/k8s_access.py): the shipped manifests
and the rendered overlay require the Ray token, publish nothing outside the cluster and guard the Ray
pods with a NetworkPolicy; broken copies fail; the runbook says how to reach the dashboard."""

from __future__ import annotations

import re

import pytest

from . import k8s_access as acc
from . import k8s_schemas as sch
from . import k8s_support as ks
from .test_deployment_files import runbook_commands


def test_the_manifests_guard_the_ray_cluster():
    objects = [obj for _, obj in ks.all_objects()]
    assert acc.access_errors(objects) == []
    clusters = [label for label, obj in ks.all_objects() if sch.cluster_specs(obj)]
    assert len(clusters) == 4  # the RayCluster, the retraining template, the RayCronJob and the RayService
    # KubeRay accepts authOptions.mode token from Ray 2.52 on
    assert tuple(int(n) for n in ks.pyproject_pin("ray").split(".")[:2]) >= (2, 52)


def test_the_rendered_overlay_guards_the_ray_cluster():
    path, why_not = ks.kubectl()
    if path is None:
        pytest.skip(why_not)
    objects = ks.render(ks.K8S_DIR / "overlays" / "example")
    assert acc.access_errors(objects) == []
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "NetworkPolicy"] == ["trim-ray"]


BROKEN = {  # (file, field, value, what the errors then say)
    "token auth off": ("base/raycluster.yaml", "spec.authOptions.mode", "disabled", "not token auth"),
    "the token of another Secret": ("schedule/cronjob/retrain-template.yaml",
                                    "spec.rayClusterSpec.authOptions.secretName", "trim-credentials", "not token auth"),
    "a LoadBalancer head": ("base/raycluster.yaml", "spec.headGroupSpec.serviceType", "LoadBalancer", "publishes"),
    "an Ingress for the head": ("schedule/raycronjob/raycronjob.yaml",
                                "spec.jobTemplate.rayClusterSpec.headGroupSpec.enableIngress", True, "publishes"),
    "pods the policy misses": ("base/raycluster.yaml", "spec.workerGroupSpecs.1.template.metadata.labels",
                               {"app": "trim"}, "without the label"),
    "every port to the submitters": ("base/networkpolicy.yaml", "spec.ingress.1.ports", [], "ports all"),
    "the Ray Client port too": ("base/networkpolicy.yaml", "spec.ingress.1.ports.1", {"port": 10001}, "ports"),
    "anyone may submit": ("base/networkpolicy.yaml", "spec.ingress.1.from", [], "every source"),
    "a whole namespace": ("base/networkpolicy.yaml", "spec.ingress.1.from.1", {"namespaceSelector": {}},
                          "whole networks or namespaces"),
    "egress only": ("base/networkpolicy.yaml", "spec.policyTypes", ["Egress"], "does not restrict ingress"),
    "another pod selector": ("base/networkpolicy.yaml", "spec.podSelector", {}, "expected one"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_copy_fails(case):
    relative, field, value, expected = BROKEN[case]
    objects = {label.split("#")[0]: obj for label, obj in ks.all_objects()}
    broken = ks.load(relative)
    ks.set_at(broken, field, value)
    assert sch.validation_errors(broken) == []  # still a valid object: only the access check tells
    errors = acc.access_errors([broken if label == relative else obj for label, obj in objects.items()])
    assert any(expected in e for e in errors), errors


def test_users_may_read_the_ray_token_and_no_other_secret():
    role = ks.load("base/rbac-users.yaml")
    rules = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    assert rules == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [acc.TOKEN_SECRET],
                      "verbs": ["get"]}]


def test_the_runbook_creates_the_token_and_reaches_the_dashboard_through_a_port_forward():
    commands = runbook_commands()
    assert any(f"create secret generic {acc.TOKEN_SECRET}" in c and "auth_token=" in c for c in commands)
    assert any(re.search(r"port-forward svc/trim-head-svc \d+:8265", c) for c in commands)
    assert any(c.startswith("export RAY_AUTH_MODE=token") for c in commands)
    assert any(c.startswith("export RAY_AUTH_TOKEN=") and acc.TOKEN_SECRET in c for c in commands)
    assert any(c.startswith("ray job submit --address http://localhost:") for c in commands)
