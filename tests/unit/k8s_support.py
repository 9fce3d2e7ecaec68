"""Offline checks of the KubeRay/Kubernetes manifests, used by test_k8s_manifests.py.

Every check returns a list of readable error strings (empty when all is well), so a test can assert
both that the shipped files pass and that a broken copy of them fails.

- `render`: a small kustomize (resources, images, patches) that refuses anything else it meets;
- `validation_errors`: core kinds through kubernetes-validate (strict); ray.io kinds through KubeRay's
  CRD schemas plus a strict pass for fields the schema does not define, their metadata and pod
  templates through Kubernetes' own strict schemas, and the rules KubeRay's operator checks in Go;
- `entrypoint_errors`: a RayJob's entrypoint runs `python jobs/<stage>.py` with a recipe that exists,
  override keys the jobs accept and ${VARS} the Ray head defines, quoted for KubeRay's submitter;
- `credential_findings` / `text_credential_findings`: no credential in a manifest or a text file.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "infra" / "k8s"
SCHEMA_DIR = Path(os.environ.get("KUBERAY_SCHEMAS", REPO / "infra" / "k8s" / "schemas" / "kuberay"))
"""KubeRay's CRD schemas, vendored (see infra/k8s/schemas/kuberay/README.md); KUBERAY_SCHEMAS overrides."""

K8S_VERSIONS = ("1.31.0", kv_utils.latest_version())
"""Core kinds must validate against an older floor and the newest Kubernetes the validator knows."""

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}

OVERRIDE_KEYS = {"paths.root", "paths.mixture", "paths.image_root", "paths.clip", "paths.llm",
                 "train.run_name", "train.num_workers", "precompute.concurrency",
                 "precompute.num_gpus_per_actor"}
"""The `--set section.key=value` keys the jobs' contract lets deployments use."""

STAGES = ("shard", "precompute", "finetune", "evaluate")


# --- YAML ---------------------------------------------------------------------------------------

def load_yaml(path: Path) -> list[Any]:
    """The non-empty documents of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    # The vendored CRD schemas under infra/k8s/schemas/ are inputs of the checks, not manifests.
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if "schemas" not in p.relative_to(K8S_DIR).parts)


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml"))


def object_id(obj: dict) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('name') or meta.get('generateName', '?')}"


# --- a small kustomize --------------------------------------------------------------------------

class KustomizeError(Exception):
    pass


KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}


def render(directory: Path, kustomization: dict | None = None) -> list[dict]:
    """What `kubectl kustomize directory` prints, for the subset of kustomize the overlays use:
    resources (files and directories), patches (JSON 6902 with a target, or a merge patch without
    lists that names its target) and images. Anything else is an error rather than a guess."""
    k = kustomization if kustomization is not None else load_yaml(directory / "kustomization.yaml")[0]
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: kustomization fields this check cannot render: {sorted(unknown)}")
    objects: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else load_yaml(path)
    ids = [object_id(o) for o in objects]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise KustomizeError(f"{directory}: the same resource twice: {duplicates}")
    for patch in k.get("patches", []):
        _apply_patch(objects, patch, directory)
    for image in k.get("images", []):
        _set_image(objects, image)
    return objects


def _select(objects: list[dict], target: dict) -> list[dict]:
    unknown = set(target) - {"kind", "name"}
    if unknown:
        raise KustomizeError(f"patch target fields this check cannot match: {sorted(unknown)}")
    return [o for o in objects
            if target.get("kind", o["kind"]) == o["kind"]
            and target.get("name", o["metadata"].get("name")) == o["metadata"].get("name")]


def _apply_patch(objects: list[dict], patch: dict, directory: Path) -> None:
    doc = load_yaml(directory / patch["path"])[0] if "path" in patch else yaml.safe_load(patch["patch"])
    if isinstance(doc, list):  # JSON 6902 operations
        if "target" not in patch:
            raise KustomizeError(f"{directory}: a JSON 6902 patch needs a target")
        targets = _select(objects, patch["target"])
        for obj in targets:
            _json_patch(obj, doc)
    else:  # a merge patch: maps merge, lists would be replaced (strategic merge differs: refuse them)
        if _contains_list(doc):
            raise KustomizeError(f"{directory}: merge patch with a list; use a JSON 6902 patch instead")
        targets = _select(objects, patch.get("target") or {"kind": doc["kind"], "name": doc["metadata"]["name"]})
        for obj in targets:
            _merge(obj, doc)
    if not targets:
        raise KustomizeError(f"{directory}: patch {patch.get('path') or patch.get('target')} matches no resource")


def _contains_list(value: Any) -> bool:
    if isinstance(value, list):
        return True
    return isinstance(value, dict) and any(_contains_list(v) for v in value.values())


def _merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _json_patch(obj: dict, operations: list[dict]) -> None:
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = obj
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                if op["op"] == "add":
                    node.insert(index, copy.deepcopy(op["value"]))
                elif op["op"] == "replace":
                    node[index] = copy.deepcopy(op["value"])
                elif op["op"] == "remove":
                    del node[index]
                else:
                    raise KustomizeError(f"unsupported JSON patch op {op['op']!r}")
            elif op["op"] in ("add", "replace"):
                if op["op"] == "replace" and last not in node:
                    raise KeyError(last)
                node[last] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del node[last]
            else:
                raise KustomizeError(f"unsupported JSON patch op {op['op']!r}")
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise KustomizeError(f"{object_id(obj)}: JSON patch path {op['path']} not found ({err})") from err


def _set_image(objects: list[dict], image: dict) -> None:
    """kustomize's images transformer: any `containers` or `initContainers` list, at any depth."""
    for node in walk_dicts(objects):
        for key in ("containers", "initContainers"):
            for container in node.get(key) or []:
                name, tag = split_image(container.get("image", ""))
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def split_image(ref: str) -> tuple[str, str]:
    """('registry:5000/ns/name', 'tag') from 'registry:5000/ns/name:tag'."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return (ref[:colon], ref[colon + 1:]) if colon > slash else (ref, "latest")


def walk_dicts(value: Any) -> Iterator[dict]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from walk_dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_dicts(item)


def _walk_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_strings(item, f"{path}[{i}]")


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
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 41}
"""53 keeps the operator's service names within 63 characters; a RayJob's cluster adds 6, a
RayCronJob's RayJob another 6."""
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


def pyproject_pin(package: str) -> str:
    """The exact version pyproject.toml pins for `package` (e.g. 'ray' -> '2.60.0')."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise KeyError(f"pyproject.toml pins no exact version of {package}")


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
    return errors


def cron_errors(schedule: str) -> list[str]:
    fields = schedule.split()
    if len(fields) != 5 or not all(CRON_FIELD.fullmatch(f) for f in fields):
        return [f"schedule {schedule!r} is not a five-field cron expression"]
    return []


# --- entrypoints --------------------------------------------------------------------------------

VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def dollars_outside_single_quotes(text: str) -> bool:
    """Whether bash would expand a `$` in `text` (as KubeRay's submitter pod runs it)."""
    single = double = False
    for i, char in enumerate(text):
        if char == "'" and not double:
            single = not single
        elif char == '"' and not single and (i == 0 or text[i - 1] != "\\"):
            double = not double
        elif char == "$" and not single:
            return True
    return False


def split_commands(entrypoint: str) -> list[list[str]]:
    """The commands an entrypoint runs, as argv lists: bash -c '...' unwrapped, split on &&."""
    tokens = shlex.split(entrypoint)
    if tokens[:2] == ["bash", "-c"] and len(tokens) == 3:
        tokens = shlex.split(tokens[2])
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token == "&&":
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


def parse_job_command(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """(job path, recipe, ['section.key=value', ...]) of `python jobs/<stage>.py --recipe R --set ...`;
    ValueError on any other shape."""
    if len(argv) < 2 or argv[0] != "python" or not re.fullmatch(r"jobs/[\w-]+\.py", argv[1]):
        raise ValueError(f"not a `python jobs/<stage>.py ...` command: {shlex.join(argv)}")
    recipe, overrides, rest = None, [], argv[2:]
    while rest:
        flag, value, rest = rest[0], rest[1:2], rest[2:]
        if not value:
            raise ValueError(f"{flag} without a value in {shlex.join(argv)}")
        if flag == "--recipe":
            recipe = value[0]
        elif flag == "--set":
            overrides.append(value[0])
        else:
            raise ValueError(f"unknown flag {flag} in {shlex.join(argv)}")
    return argv[1], recipe, overrides


def job_command_errors(argv: list[str], defined: set[str] | None = None) -> list[str]:
    """A `python jobs/...` command names a job file and a recipe that exist in the repo and only
    override keys of the contract; with `defined`, its ${VARS} are all defined."""
    try:
        job, recipe, overrides = parse_job_command(argv)
    except ValueError as err:
        return [str(err)]
    errors = []
    if not (REPO / job).is_file():
        errors.append(f"{job} does not exist in the repo")
    if recipe is None:
        errors.append(f"{job}: no --recipe")
    elif not (REPO / "recipes" / f"{recipe}.toml").is_file():
        errors.append(f"{job}: recipe recipes/{recipe}.toml does not exist")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key not in OVERRIDE_KEYS:
            errors.append(f"{job}: --set {override}: not one of {sorted(OVERRIDE_KEYS)}")
        for var in VAR.findall(value) if defined is not None else ():
            if var not in defined:
                errors.append(f"{job}: --set {override}: ${{{var}}} is not defined on the Ray head")
    return errors


def entrypoint_errors(entrypoint: str, defined: set[str]) -> list[str]:
    """Errors of a RayJob entrypoint run on a head whose environment defines `defined`."""
    errors = []
    if dollars_outside_single_quotes(entrypoint):
        errors.append("a $ outside single quotes: KubeRay's submitter pod would expand it in its own "
                      "environment, which lacks the ConfigMap (quote it: '--set key=${VAR}')")
    try:
        commands = split_commands(entrypoint)
    except ValueError as err:
        return errors + [f"entrypoint does not parse as shell words: {err}"]
    for argv in commands:
        errors += job_command_errors(argv, defined)
    return errors


def container_env_names(container: dict, configmaps: dict[str, dict]) -> set[str]:
    """Variables a container's environment defines: env, plus the keys of envFrom ConfigMaps."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref and ref["name"] in configmaps:
            names |= set(configmaps[ref["name"]].get("data", {}))
    return names


def head_container(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]


# --- credentials --------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY",
                         re.IGNORECASE)
REFERENCE_KEY = re.compile(r"(Name|Ref|Path|File)$")
"""camelCase keys that name where a secret is (secretName, secretRef...), not the secret itself."""
CREDENTIAL_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@", re.IGNORECASE),
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "a GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "a JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\."),
    "a secret assigned literally": re.compile(
        r"\b[A-Z0-9_]*(?:SECRET|PASSWORD|TOKEN|ACCESS_KEY)[A-Z0-9_]*=(?![\"']?\$)[^\s\"']+"),
}


def _is_literal(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != "" and not value.strip().startswith("$")


def credential_findings(obj: Any, where: str = "") -> list[str]:
    """Credentials written into a manifest: a secret-named env var or key with a literal value, a
    Secret with data, or a string that looks like a key, a token or a URL with a password."""
    found = []
    for path, text in _walk_strings(obj):
        found += [f"{where}{path}: {label}" for label, rx in CREDENTIAL_PATTERNS.items() if rx.search(text)]
    for node in walk_dicts(obj):
        if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) and _is_literal(node.get("value")):
            found.append(f"{where}: env {node['name']} has a literal value (use valueFrom.secretKeyRef)")
        for key, value in node.items():
            if key not in ("name", "value") and SECRET_NAME.search(key) and not REFERENCE_KEY.search(key) \
                    and _is_literal(value):
                found.append(f"{where}: {key} holds a literal value")
    if isinstance(obj, dict) and obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        found.append(f"{where}: a Secret with values in the repository")
    return found


def text_credential_findings(text: str, where: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [f"{where}:{number}: {label}" for label, rx in CREDENTIAL_PATTERNS.items() if rx.search(line)]
    return found
