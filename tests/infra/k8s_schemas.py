"""Validation of one Kubernetes or KubeRay object, offline; every check returns readable errors.

Core kinds go through kubernetes-validate (strict); ray.io kinds through KubeRay's CRD schemas plus
a strict pass for fields the schema does not define, their metadata and pod templates through
Kubernetes' own strict schemas, and the rules KubeRay's operator checks in Go.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from .k8s_support import REPO, object_id, pyproject_pin

SCHEMA_DIR = Path(os.environ.get("KUBERAY_SCHEMAS", REPO / "infra" / "k8s" / "schemas" / "kuberay"))
"""KubeRay's CRD schemas, vendored (see infra/k8s/schemas/kuberay/README.md); KUBERAY_SCHEMAS overrides."""

K8S_VERSIONS = ("1.31.0", kv_utils.latest_version())
"""Core kinds must validate against an older floor and the newest Kubernetes the validator knows."""

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


# --- schemas ------------------------------------------------------------------------------------

@functools.cache
def crd_schema(kind: str) -> dict:
    """The ray.io/v1 openAPIV3Schema of a KubeRay kind."""
    if not SCHEMA_DIR.is_dir():
        raise FileNotFoundError(f"KubeRay CRD schemas not found in {SCHEMA_DIR} (set KUBERAY_SCHEMAS)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 3 MB of schemas in 0.4 s
    crd = yaml.load((SCHEMA_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(crd_schema(kind))


@functools.cache
def k8s_type_validator(schema_file: str, version: str = K8S_VERSIONS[-1]) -> jsonschema.Draft202012Validator:
    """A validator for one Kubernetes type (e.g. podtemplatespec-v1.json) from kubernetes-validate's
    strict schemas, which reject properties the API does not define."""
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{folder}/{schema_file}", version)
    definitions = kv_utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def unknown_fields(value: Any, schema: dict, path: str = "") -> list[str]:
    """Keys of `value` that `schema` does not define. KubeRay's CRD schemas never set
    additionalProperties: false, so a misspelled field passes them; the API server would prune it
    silently. This walks the object beside the schema and names every such key."""
    errors: list[str] = []
    properties = schema.get("properties")
    extra = schema.get("additionalProperties")
    if isinstance(value, dict):
        for key, item in value.items():
            if properties is not None and key in properties:
                errors += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += unknown_fields(item, extra, f"{path}.{key}")
            elif properties is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{key}: not a field of the schema")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return errors


def _schema_errors(validator: jsonschema.Validator, value: Any, where: str) -> list[str]:
    return [f"{where}{''.join(f'.{p}' for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(value)]


def validation_errors(obj: dict) -> list[str]:
    """Everything wrong with one object, as far as can be told offline."""
    if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
        return [f"not a Kubernetes object: {str(obj)[:80]}"]
    if obj["apiVersion"].startswith("ray.io/"):
        return ray_errors(obj)
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            errors.append(f"{object_id(obj)}: Kubernetes {version} (strict): {where}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{object_id(obj)}: {err.message}")
    return errors


def ray_errors(obj: dict) -> list[str]:
    kind = obj["kind"]
    if obj["apiVersion"] != "ray.io/v1" or kind not in CRD_FILES:
        return [f"{object_id(obj)}: no KubeRay schema for {obj['apiVersion']} {kind}"]
    name = object_id(obj)
    errors = _schema_errors(_crd_validator(kind), obj, f"{name}: schema: ")
    errors += [f"{name}: strict: {e}" for e in unknown_fields(obj, crd_schema(kind))]
    errors += _schema_errors(k8s_type_validator("objectmeta-meta-v1.json"), obj.get("metadata", {}),
                             f"{name}: metadata")
    for path, template in pod_templates(obj):
        errors += _schema_errors(k8s_type_validator("podtemplatespec-v1.json"), template, f"{name}: {path}")
    try:
        errors += [f"{name}: {e}" for e in kuberay_rule_errors(obj)]
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # a shape the schema already rejects
        errors.append(f"{name}: KubeRay's rules not checked on a malformed object ({err!r})")
    return errors


# --- KubeRay's own rules (the operator checks these in Go; the CRD schema cannot) ---------------

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 41, "RayService": 47}
"""53 keeps the operator's service names within 63 characters; a RayJob's or a RayService's cluster
adds 6, a RayCronJob's RayJob another 6."""
UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")
"""The RayService upgrade strategies KubeRay's operator accepts."""
RAY_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?-]+")


def job_spec(obj: dict) -> dict | None:
    """The RayJob spec of a RayJob, or of the jobs a RayCronJob creates."""
    if obj.get("kind") == "RayJob":
        return obj.get("spec", {})
    if obj.get("kind") == "RayCronJob":
        return obj.get("spec", {}).get("jobTemplate", {})
    return None


def cluster_specs(obj: dict) -> list[tuple[str, dict]]:
    if obj.get("kind") == "RayCluster":
        return [("spec", obj.get("spec", {}))]
    if obj.get("kind") == "RayService":
        return [("spec.rayClusterConfig", obj.get("spec", {}).get("rayClusterConfig", {}))]
    spec = job_spec(obj)
    prefix = "spec.jobTemplate" if obj.get("kind") == "RayCronJob" else "spec"
    if spec and isinstance(spec.get("rayClusterSpec"), dict):
        return [(f"{prefix}.rayClusterSpec", spec["rayClusterSpec"])]
    return []


def groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(path, group) for the head group and each worker group."""
    found = [("headGroupSpec", cluster_spec.get("headGroupSpec", {}))]
    for i, group in enumerate(cluster_spec.get("workerGroupSpecs", [])):
        found.append((f"workerGroupSpecs[{i}]", group))
    return found


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    found = [(f"{path}.{g}.template", group.get("template", {}))
             for path, cs in cluster_specs(obj) for g, group in groups(cs)]
    spec = job_spec(obj)
    if spec and "submitterPodTemplate" in spec:
        found.append(("submitterPodTemplate", spec["submitterPodTemplate"]))
    return found


def kuberay_rule_errors(obj: dict) -> list[str]:
    errors = []
    kind, meta = obj["kind"], obj.get("metadata", {})
    name = meta.get("name") or meta.get("generateName", "") + "x" * 5
    if not DNS1035.fullmatch(name) or len(name) > MAX_NAME[kind]:
        errors.append(f"name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    for path, cs in cluster_specs(obj):
        if cs.get("rayVersion") != pyproject_pin("ray"):
            errors.append(f"{path}.rayVersion {cs.get('rayVersion')!r} != the ray pin in pyproject.toml")
        for gpath, group in groups(cs):
            params = group.get("rayStartParams", {})
            if group.get("resources") and any(p in params for p in RAY_RESOURCE_PARAMS):
                errors.append(f"{path}.{gpath}: resources set both in rayStartParams and resources")
            if not group.get("template", {}).get("spec", {}).get("containers"):
                errors.append(f"{path}.{gpath}: no container")
            bounds = [group.get(k, d) for k, d in (("minReplicas", 0), ("replicas", 0), ("maxReplicas", 2**31))]
            if gpath != "headGroupSpec" and bounds != sorted(bounds):
                errors.append(f"{path}.{gpath}: replicas outside [minReplicas, maxReplicas]")
    spec = job_spec(obj)
    if spec is not None:
        selector, cluster = spec.get("clusterSelector"), spec.get("rayClusterSpec")
        if bool(selector) == bool(cluster):
            errors.append("exactly one of rayClusterSpec and clusterSelector must be set")
        if selector and not selector.get("ray.io/cluster"):
            errors.append("clusterSelector must name the cluster under ray.io/cluster")
        if spec.get("suspend") and (selector or not spec.get("shutdownAfterJobFinishes")):
            errors.append("a suspended RayJob needs its own cluster and shutdownAfterJobFinishes: true")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("submissionMode") != "K8sJobMode":
            errors.append("submissionMode must be K8sJobMode: the entrypoints' quoting assumes the "
                          "submitter's bash (see infra/k8s/stages/shard.yaml)")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            errors.append("activeDeadlineSeconds must be positive")
        if "runtimeEnvYAML" in spec:
            try:
                yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as err:
                errors.append(f"runtimeEnvYAML does not parse: {err}")
    if kind == "RayCronJob":
        errors += cron_errors(obj.get("spec", {}).get("schedule", ""))
    if kind == "RayService":
        errors += service_errors(obj.get("spec", {}))
    return errors


def service_errors(spec: dict) -> list[str]:
    """What KubeRay's operator refuses in a RayService (ValidateRayServiceSpec), and a Serve config
    that does not parse or names no application."""
    errors = []
    cluster = spec.get("rayClusterConfig", {})
    if cluster.get("authOptions", {}).get("enableK8sTokenAuth"):
        errors.append("Kubernetes token auth is not supported for a RayService")
    if cluster.get("headGroupSpec", {}).get("headService", {}).get("metadata", {}).get("name"):
        errors.append("rayClusterConfig.headGroupSpec.headService.metadata.name must not be set")
    strategy = spec.get("upgradeStrategy", {})
    if "type" in strategy and strategy["type"] not in UPGRADE_TYPES:
        errors.append(f"upgradeStrategy.type {strategy['type']!r} is not one of {', '.join(UPGRADE_TYPES)}")
    if strategy.get("type") == "NewClusterWithIncrementalUpgrade":
        options = strategy.get("clusterUpgradeOptions") or {}
        if not cluster.get("enableInTreeAutoscaling"):
            errors.append("NewClusterWithIncrementalUpgrade needs the Ray autoscaler")
        surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent")
        if step is None or not 0 <= step <= surge <= 100 or options.get("intervalSeconds", 0) <= 0:
            errors.append("clusterUpgradeOptions: 0 <= stepSizePercent <= maxSurgePercent <= 100 and "
                          "intervalSeconds > 0 are required")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("rayClusterDeletionDelaySeconds must not be negative")
    try:
        serve = yaml.safe_load(spec.get("serveConfigV2", "")) or {}
    except yaml.YAMLError as err:
        return errors + [f"serveConfigV2 does not parse: {err}"]
    apps = serve.get("applications") if isinstance(serve, dict) else None
    if not apps or not all(isinstance(a, dict) and a.get("import_path") for a in apps):
        errors.append("serveConfigV2 must list applications, each with an import_path")
    return errors


def cron_errors(schedule: str) -> list[str]:
    fields = schedule.split()
    if len(fields) != 5 or not all(CRON_FIELD.fullmatch(f) for f in fields):
        return [f"schedule {schedule!r} is not a five-field cron expression"]
    return []
