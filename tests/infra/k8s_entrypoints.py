"""The commands a RayJob runs: its entrypoint runs `python jobs/<stage>.py` with a recipe that exists,
override keys the jobs accept and ${VARS} the Ray head defines, quoted for KubeRay's submitter."""

from __future__ import annotations

import re
import shlex

from .k8s_schemas import job_spec
from .k8s_support import REPO, configmaps, load

OVERRIDE_KEYS = {"paths.root", "paths.mixture", "paths.image_root", "paths.clip", "paths.llm",
                 "train.run_name", "train.num_workers", "precompute.concurrency",
                 "precompute.num_gpus_per_actor", "precompute.keep_versions", "shard.keep_versions"}
"""The `--set section.key=value` keys the jobs' contract lets deployments use."""

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


# --- what the shipped jobs run, and where ---------------------------------------------------------

def cluster_of(obj: dict) -> dict:
    """The RayCluster spec a RayJob or RayCronJob runs on: its own, or the one its selector names."""
    spec = job_spec(obj) or {}
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"]
    cluster = load("base/raycluster.yaml")
    if spec["clusterSelector"]["ray.io/cluster"] != cluster["metadata"]["name"]:
        raise ValueError(f"{spec['clusterSelector']} selects no cluster of infra/k8s/base")
    return cluster["spec"]


def head_env(obj: dict) -> set[str]:
    """The variables the Ray head of `obj`'s cluster defines, with the base settings."""
    return container_env_names(head_container(cluster_of(obj)), configmaps([load("base/settings.yaml")]))


def job_commands(obj: dict) -> list[tuple[str, str | None, dict[str, str]]]:
    """(job, recipe, overrides) of every command of an entrypoint, ${VARS} expanded from the base
    settings."""
    values = load("base/settings.yaml")["data"]
    found = []
    for argv in split_commands((job_spec(obj) or {})["entrypoint"]):
        job, recipe, overrides = parse_job_command(argv)
        expanded = [VAR.sub(lambda m: values[m.group(1)], o) for o in overrides]
        found.append((job, recipe, dict(o.split("=", 1) for o in expanded)))
    return found
