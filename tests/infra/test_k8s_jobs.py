"""The jobs the manifests run, checked offline: every RayJob's entrypoint runs a real job with a real
recipe and overrides, fits its cluster and finds its models; the retraining runs the four stages,
on either schedule, and the CronJob's submitter (infra/k8s/submit_rayjob.py) creates and prunes runs.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from . import k8s_entrypoints as ep
from . import k8s_schemas as sch
from . import k8s_support as ks

K8S = ks.K8S_DIR


def gpu_capacity(cluster_spec: dict) -> int:
    return sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * g["maxReplicas"] for g in cluster_spec["workerGroupSpecs"])


# --- entrypoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("label, obj", ks.ray_jobs(), ids=[label for label, _ in ks.ray_jobs()])
def test_entrypoint_runs_a_real_job_with_a_real_recipe(label, obj):
    assert ep.entrypoint_errors(sch.job_spec(obj)["entrypoint"], ep.head_env(obj)) == []


BROKEN_ENTRYPOINTS = {
    "missing job": ("jobs/shard.py", "jobs/sharding.py", "does not exist"),
    "missing recipe": ("--recipe llava-1.5-7b", "--recipe llava-1.5-70b", "does not exist"),
    "unknown override": ("'paths.root=", "'paths.rooot=", "not one of"),
    "unquoted variable": ("'paths.root=${TRIM_ROOT}'", "paths.root=${TRIM_ROOT}", "outside single quotes"),
    "undefined variable": ("${TRIM_ROOT}", "${TRIM_BUCKET}", "not defined"),
    "not a job": ("python jobs/shard.py", "python -m jobs.shard", "not a `python jobs/"),
    "unknown flag": ("--recipe", "--recipes", "unknown flag"),
}


@pytest.mark.parametrize("case", BROKEN_ENTRYPOINTS, ids=list(BROKEN_ENTRYPOINTS))
def test_a_broken_entrypoint_fails(case):
    old, new, expected = BROKEN_ENTRYPOINTS[case]
    job = ks.load("stages/shard.yaml")
    entrypoint = job["spec"]["entrypoint"]
    assert old in entrypoint and ep.entrypoint_errors(entrypoint, ep.head_env(job)) == []
    errors = ep.entrypoint_errors(entrypoint.replace(old, new), ep.head_env(job))
    assert any(expected in e for e in errors), errors


def test_the_retraining_runs_the_four_stages_in_order_under_a_run_named_after_the_cache():
    from pipelines.config import load_recipe
    from pipelines.train.run_names import CACHE_VERSION, cache_version_of_run, expand_run_name

    template = ks.load("schedule/cronjob/retrain-template.yaml")
    commands = ep.job_commands(template)
    assert [job for job, _, _ in commands] == [f"jobs/{s}.py" for s in ks.STAGES]
    assert {recipe for _, recipe, _ in commands} == {"llava-1.5-7b"}
    # finetune and evaluate share the run name: the settings' name and the cache version the jobs put
    # in, so new data is a new run and a rerun on the same cache resumes (tests/integration/
    # test_scheduled_retrain.py runs this sequence)
    name = commands[2][2]["train.run_name"]
    assert commands[3][2]["train.run_name"] == name
    assert name == f"{ks.load('base/settings.yaml')['data']['TRIM_RUN_NAME']}-{CACHE_VERSION}"
    resolved = expand_run_name(load_recipe("llava-1.5-7b", [f"train.run_name={name}"]).train.run_name,
                               "v-0123456789ab")
    assert cache_version_of_run(name, resolved) == "v-0123456789ab"
    # the manual fine-tune keeps a plain name: resuming it on another cache is refused, not renamed
    assert CACHE_VERSION not in ep.job_commands(ks.load("stages/finetune.yaml"))[0][2]["train.run_name"]


def test_the_entrypoints_fit_the_cluster_and_train_with_zero3():
    from pipelines.config import load_recipe

    checked = 0
    for label, obj in ks.ray_jobs():
        gpus = gpu_capacity(ep.cluster_of(obj))
        for job, recipe_name, overrides in ep.job_commands(obj):
            recipe = load_recipe(recipe_name, [f"{k}={v}" for k, v in overrides.items()])
            assert recipe.paths.root == ks.load("base/settings.yaml")["data"]["TRIM_ROOT"]
            if job == "jobs/precompute.py":
                assert recipe.precompute.concurrency * recipe.precompute.num_gpus_per_actor <= gpus, label
                checked += 1
            if job == "jobs/finetune.py":
                assert recipe.train.use_gpu and recipe.train.num_workers <= gpus, label
                zero = json.loads((ks.REPO / recipe.train.deepspeed_config).read_text())
                assert zero["zero_optimization"]["stage"] == 3, "the runbook promises ZeRO-3"
                checked += 1
    assert checked == 6  # precompute and finetune: stage jobs, CronJob template, RayCronJob


def test_models_are_fetched_where_the_recipe_reads_them():
    from pipelines.config import load_recipe

    settings = ks.load("base/settings.yaml")["data"]
    recipes = {recipe for _, obj in ks.ray_jobs() for _, recipe, _ in ep.job_commands(obj)}
    for name in recipes:
        paths = load_recipe(name).paths
        assert settings["TRIM_CLIP_DIR"] == paths.clip
        assert settings["TRIM_LLM_DIR"] == paths.llm
        assert f"{settings['TRIM_PROJECTOR_DIR']}/mm_projector.bin" == paths.projector
    gpu_group = ks.load("base/raycluster.yaml")["spec"]["workerGroupSpecs"][1]
    (fetch,) = gpu_group["template"]["spec"]["initContainers"]
    assert '"$TRIM_PROJECTOR_REPO" mm_projector.bin --local-dir "$TRIM_PROJECTOR_DIR"' in fetch["args"][0]


def test_container_commands_use_only_variables_their_environment_defines():
    maps = ks.configmaps([ks.load("base/settings.yaml")])
    checked = 0
    for label, obj in ks.all_objects():
        for node in ks.walk_dicts(obj):
            for container in node.get("containers", []) + node.get("initContainers", []):
                used = {v for arg in container.get("command", []) + container.get("args", [])
                        for v in ep.VAR.findall(arg)}
                assert used <= ep.container_env_names(container, maps), f"{label}: {container['name']}"
                checked += bool(used)
    assert checked >= 9  # the model fetchers of head, cpu and gpu groups, in three cluster specs


# --- the schedule -----------------------------------------------------------------------------------

def test_both_schedules_run_the_same_job_on_a_copy_of_the_cluster():
    cluster = ks.load("base/raycluster.yaml")["spec"]
    template = ks.load("schedule/cronjob/retrain-template.yaml")
    raycron = ks.load("schedule/raycronjob/raycronjob.yaml")
    cronjob = ks.load("schedule/cronjob/cronjob.yaml")
    assert template["spec"]["suspend"] is True, "KubeRay must never start the template itself"
    assert template["spec"]["rayClusterSpec"] == cluster, "retrain-template.yaml differs from raycluster.yaml"
    assert raycron["spec"]["jobTemplate"] == {k: v for k, v in template["spec"].items() if k != "suspend"}
    assert raycron["spec"]["schedule"] == cronjob["spec"]["schedule"]
    assert raycron["spec"]["timeZone"] == cronjob["spec"]["timeZone"]
    assert sch.cron_errors(cronjob["spec"]["schedule"]) == []
    assert template["spec"]["shutdownAfterJobFinishes"] is True


def test_the_cronjob_submitter_has_exactly_the_rbac_it_uses():
    cronjob = ks.load("schedule/cronjob/cronjob.yaml")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    role = ks.load("schedule/cronjob/rbac.yaml", "Role")
    binding = ks.load("schedule/cronjob/rbac.yaml", "RoleBinding")
    account = ks.load("schedule/cronjob/rbac.yaml", "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["get", "list", "create", "delete"]}]
    (container,) = pod["containers"]
    assert container["command"][0] == "python" and (ks.REPO / container["command"][1]).is_file()
    args = container["args"]
    assert args[args.index("--template") + 1] == ks.load("schedule/cronjob/retrain-template.yaml")["metadata"]["name"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("submit_rayjob", K8S / "submit_rayjob.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_submitter_creates_a_valid_running_copy_of_the_template(submit):
    template = ks.load("schedule/cronjob/retrain-template.yaml")
    run = submit.run_from_template(template)
    assert sch.validation_errors(run) == []
    assert run["metadata"]["generateName"] == "trim-retrain-"
    assert run["metadata"]["labels"][submit.RUN_OF_LABEL] == "trim-retrain-template"
    assert submit.TEMPLATE_LABEL not in run["metadata"]["labels"]
    assert run["spec"] == {**template["spec"], "suspend": False}


class FakeRayJobs:
    """Stands in for the API server: a template and some earlier runs."""

    def __init__(self, template, runs):
        self.template, self.runs, self.calls = template, runs, []

    def __call__(self, namespace=None):
        self.namespace = namespace or "trim"
        return self

    def call(self, method, name="", body=None, **query):
        self.calls.append((method, name, query))
        if method == "GET" and name:
            return self.template
        if method == "GET":
            return {"items": self.runs}
        if method == "POST":
            return {**body, "metadata": {**body["metadata"], "name": "trim-retrain-new01"}}
        return {}


def _run(name, status, created):
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": {"jobDeploymentStatus": status}}


def test_the_submitter_waits_for_a_running_retraining_and_prunes_finished_ones(submit, monkeypatch):
    template = ks.load("schedule/cronjob/retrain-template.yaml")
    running = FakeRayJobs(template, [_run("trim-retrain-a", "Running", "2026-01-04T03:00:00Z")])
    monkeypatch.setattr(submit, "RayJobs", running)
    assert submit.main(["--template", "trim-retrain-template"]) == 0
    assert [m for m, _, _ in running.calls] == ["GET", "GET"]  # nothing created while a run is going
    assert running.calls[1][2] == {"labelSelector": "trim-llava/run-of=trim-retrain-template"}

    finished = [_run(f"trim-retrain-{i}", "Complete" if i % 2 else "Failed", f"2026-01-{i:02d}T03:00:00Z")
                for i in range(1, 5)]
    idle = FakeRayJobs(template, finished)
    monkeypatch.setattr(submit, "RayJobs", idle)
    assert submit.main(["--template", "trim-retrain-template", "--keep", "2"]) == 0
    assert [(m, n) for m, n, _ in idle.calls] == [("GET", "trim-retrain-template"), ("GET", ""), ("POST", ""),
                                                  ("DELETE", "trim-retrain-2"), ("DELETE", "trim-retrain-1")]
