"""Who can reach the Ray cluster, checked on a set of objects: every cluster asks for the Ray token of
one Secret, no Service, Ingress or head group publishes the dashboard, and a NetworkPolicy admits
the Ray pods to each other and job submission (dashboard port only) to them, nothing else."""

from __future__ import annotations

from typing import Any

from .k8s_schemas import cluster_specs, groups
from .k8s_support import object_id

TOKEN_SECRET = "trim-ray-token"
DASHBOARD_PORT = 8265
RAY_POD_LABELS = {"app.kubernetes.io/name": "trim-llava", "ray.io/is-ray-node": "yes"}
"""The project's label (on every Ray pod template) and the one KubeRay puts on every Ray pod."""
PUBLIC_SERVICE_TYPES = {"NodePort", "LoadBalancer"}


def token_errors(obj: dict) -> list[str]:
    errors = []
    for path, cluster in cluster_specs(obj):
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") != "token" or auth.get("secretName") != TOKEN_SECRET:
            errors.append(f"{object_id(obj)}: {path}.authOptions is not token auth with the Secret {TOKEN_SECRET}")
    return errors


def publication_errors(obj: dict) -> list[str]:
    """A dashboard reachable from outside the cluster: a public Service, an Ingress, a head group that
    asks KubeRay for either."""
    errors = []
    if obj.get("kind") == "Ingress":
        errors.append(f"{object_id(obj)}: an Ingress")
    if obj.get("kind") == "Service" and obj.get("spec", {}).get("type") in PUBLIC_SERVICE_TYPES:
        errors.append(f"{object_id(obj)}: a {obj['spec']['type']} Service")
    for path, cluster in cluster_specs(obj):
        head = cluster.get("headGroupSpec", {})
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            errors.append(f"{object_id(obj)}: {path}.headGroupSpec publishes the head outside the cluster")
        for gpath, group in groups(cluster):
            labels = group.get("template", {}).get("metadata", {}).get("labels", {})
            if labels.get("app.kubernetes.io/name") != RAY_POD_LABELS["app.kubernetes.io/name"]:
                errors.append(f"{object_id(obj)}: {path}.{gpath}: pods without the label the NetworkPolicy selects")
    return errors


def _is_ray_pods(peer: dict) -> bool:
    return set(peer) == {"podSelector"} and peer["podSelector"] == {"matchLabels": RAY_POD_LABELS}


def network_policy_errors(objects: list[dict]) -> list[str]:
    """The NetworkPolicy that guards the Ray pods: selects them, restricts ingress, and lets in only
    the Ray pods (any port) and other callers on the dashboard's port alone."""
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"
                and o.get("spec", {}).get("podSelector") == {"matchLabels": RAY_POD_LABELS}]
    if len(policies) != 1:
        return [f"{len(policies)} NetworkPolicies select the Ray pods ({RAY_POD_LABELS}); expected one"]
    spec, errors = policies[0]["spec"], []
    if "Ingress" not in spec.get("policyTypes", []):
        errors.append("the NetworkPolicy does not restrict ingress")
    for i, rule in enumerate(spec.get("ingress", [])):
        peers: list[Any] = rule.get("from", [])
        if not peers or any(not p for p in peers):
            errors.append(f"ingress[{i}]: admits every source")
        if peers and all(_is_ray_pods(p) for p in peers):
            continue
        ports = [(p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports", [])]
        if ports != [(DASHBOARD_PORT, "TCP")]:
            errors.append(f"ingress[{i}]: callers other than the Ray pods get ports {ports or 'all'}, "
                          f"not the dashboard's {DASHBOARD_PORT} alone")
        for peer in peers:
            if "ipBlock" in peer or ("namespaceSelector" in peer and not peer.get("podSelector")):
                errors.append(f"ingress[{i}]: admits whole networks or namespaces: {peer}")
    return errors


def access_errors(objects: list[dict]) -> list[str]:
    errors = [e for o in objects for e in token_errors(o) + publication_errors(o)]
    return errors + network_policy_errors(objects)
