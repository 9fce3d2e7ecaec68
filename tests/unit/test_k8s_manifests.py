"""The deployment, checked offline: KubeRay and Kubernetes manifests, overlays, image, runbook.

No cluster, kustomize or docker is needed. The checks live in k8s_support.py; each test here runs
them on the shipped files (which must pass) and on broken copies (which must fail): a misspelled
field, a literal secret, an entrypoint naming a job, recipe or override that does not exist.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex

import pytest
import yaml

from . import k8s_support as ks

K8S = ks.K8S_DIR
OVERLAY = K8S / "overlays" / "example"
RUNBOOK = ks.REPO / "docs" / "runbook.md"
DOCKERFILE = ks.REPO / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ks.REPO / "infra" / "docker" / "Dockerfile.dockerignore"
SETTINGS = "trim-settings"
CREDENTIALS = "trim-credentials"


def load(relative: str, kind: str | None = None) -> dict:
    """A fresh copy of the (only, or only `kind`) object in infra/k8s/<relative>."""
    docs = [d for d in ks.load_yaml(K8S / relative) if kind is None or d["kind"] == kind]
    assert len(docs) == 1, f"{relative}: expected one {kind or 'object'}, found {len(docs)}"
    return docs[0]


def all_objects() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(K8S)}#{i}", obj) for p in ks.manifest_files() if p.name != "kustomization.yaml"
            for i, obj in enumerate(ks.load_yaml(p)) if obj.get("kind") != "Kustomization"]


def configmaps(objects) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o.get("kind") == "ConfigMap"}


def base_cluster() -> dict:
    return load("base/raycluster.yaml")


def cluster_of(obj: dict) -> dict:
    """The RayCluster spec a RayJob or RayCronJob runs on: its own, or the one its selector names."""
    spec = ks.job_spec(obj)
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"]
    cluster = base_cluster()
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    return cluster["spec"]


def head_env(obj: dict) -> set[str]:
    return ks.container_env_names(ks.head_container(cluster_of(obj)), configmaps([load("base/settings.yaml")]))


def ray_jobs() -> list[tuple[str, dict]]:
    return [(label, o) for label, o in all_objects() if o["kind"] in ("RayJob", "RayCronJob")]


def gpu_capacity(cluster_spec: dict) -> int:
    return sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * g["maxReplicas"] for g in cluster_spec["workerGroupSpecs"])


def job_commands(obj: dict) -> list[tuple[str, str, dict[str, str]]]:
    """(job, recipe, overrides) of every command of an entrypoint, ${VARS} expanded from the base
    settings (and TRIM_CLUSTER_NAME as a run of the retraining would see it)."""
    values = dict(load("base/settings.yaml")["data"], TRIM_CLUSTER_NAME="trim-retrain-abcde-fghij")
    found = []
    for argv in ks.split_commands(ks.job_spec(obj)["entrypoint"]):
        job, recipe, overrides = ks.parse_job_command(argv)
        expanded = [ks.VAR.sub(lambda m: values[m.group(1)], o) for o in overrides]
        found.append((job, recipe, dict(o.split("=", 1) for o in expanded)))
    return found


# --- every file parses, every kustomization is complete ------------------------------------------

def test_every_manifest_parses_into_kubernetes_objects():
    files = ks.manifest_files()
    assert len(files) >= 15
    for path in files:
        docs = ks.load_yaml(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and {"apiVersion", "kind"} <= set(doc), f"{path}: {doc!r:.80}"


def test_each_kustomization_lists_every_manifest_beside_it():
    for directory in ks.kustomization_dirs():
        k = ks.load_yaml(directory / "kustomization.yaml")[0]
        listed = {r for r in k.get("resources", []) if (directory / r).is_file()}
        listed |= {p["path"] for p in k.get("patches", []) if "path" in p}
        beside = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert beside == listed, f"{directory.relative_to(K8S)}: unlisted or missing files"


def test_the_stages_are_applied_one_run_at_a_time():
    files = sorted(p.stem for p in (K8S / "stages").iterdir())
    assert files == sorted(ks.STAGES), "stages/ holds one RayJob per stage and nothing else"
    for stage in ks.STAGES:
        job = load(f"stages/{stage}.yaml")
        # generateName: each `kubectl create -f` starts a new run of this stage, and only of this one
        assert job["metadata"]["generateName"] == f"trim-{stage}-" and "name" not in job["metadata"]
        assert [j for j, _, _ in job_commands(job)] == [f"jobs/{stage}.py"]


# --- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, obj", all_objects(), ids=[label for label, _ in all_objects()])
def test_manifest_validates(label, obj):
    assert ks.validation_errors(obj) == []


OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


@pytest.mark.parametrize("schedule", ["cronjob", "raycronjob"])
@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_an_overlay_renders_valid_manifests_with_its_image_bucket_and_schedule(overlay, schedule):
    kustomization = ks.load_yaml(overlay / "kustomization.yaml")[0]
    resources = [re.sub(r"schedule/\w+$", f"schedule/{schedule}", r) for r in kustomization["resources"]]
    assert sum("schedule/" in r for r in resources) == 1, "one schedule: schedule/cronjob or schedule/raycronjob"
    objects = ks.render(overlay, {**kustomization, "resources": resources})

    for obj in objects:
        assert ks.validation_errors(obj) == []
        assert ks.credential_findings(obj, ks.object_id(obj)) == []
    (image,) = kustomization["images"]
    images = {c["image"] for o in objects for node in ks.walk_dicts(o)
              for c in node.get("containers", []) + node.get("initContainers", [])}
    assert images == {f"{image['newName']}:{image['newTag']}"}, "every pod runs the overlay's image"
    (settings_patch,) = [ks.load_yaml(overlay / p["path"])[0] for p in kustomization["patches"] if "path" in p]
    assert "TRIM_ROOT" in settings_patch["data"], "the overlay names its bucket"
    base_settings = load("base/settings.yaml")["data"]
    assert configmaps(objects)[SETTINGS]["data"] == {**base_settings, **settings_patch["data"]}
    (schedule_op,) = [op for p in kustomization["patches"] if "patch" in p for op in yaml.safe_load(p["patch"])
                      if op["path"] == "/spec/schedule"]
    (scheduled,) = [o for o in objects if o["metadata"]["name"] == "trim-retrain"]
    assert scheduled["kind"] == {"cronjob": "CronJob", "raycronjob": "RayCronJob"}[schedule]
    assert scheduled["spec"]["schedule"] == schedule_op["value"] and ks.cron_errors(schedule_op["value"]) == []


def test_the_small_kustomize_refuses_what_it_cannot_render():
    good = ks.load_yaml(OVERLAY / "kustomization.yaml")[0]
    with pytest.raises(ks.KustomizeError, match="namePrefix"):
        ks.render(OVERLAY, {**good, "namePrefix": "dev-"})
    with pytest.raises(ks.KustomizeError, match="matches no resource"):
        ks.render(OVERLAY, {**good, "patches": [{"target": {"name": "no-such-thing"}, "patch":
                                                 "- {op: replace, path: /spec/schedule, value: x}"}]})
    with pytest.raises(ks.KustomizeError, match="not found"):
        ks.render(OVERLAY, {**good, "patches": [{"target": {"name": "trim-retrain"}, "patch":
                                                 "- {op: replace, path: /spec/schedul, value: x}"}]})
    with pytest.raises(ks.KustomizeError, match="the same resource twice"):
        ks.render(OVERLAY, {**good, "resources": good["resources"] + ["../../base"]})
    containers = {"spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "x"}]}}}}}}
    with pytest.raises(ks.KustomizeError, match="merge patch with a list"):
        ks.render(OVERLAY, {**good, "patches": [{"patch": yaml.safe_dump(
            {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "trim-retrain"}, **containers})}]})
    assert ks.split_image("registry:5000/ml/trim-llava:1.2") == ("registry:5000/ml/trim-llava", "1.2")
    assert ks.split_image("registry:5000/ml/trim-llava") == ("registry:5000/ml/trim-llava", "latest")


def _parent(obj: dict, dotted: str):
    *path, last = dotted.split(".")
    node = obj
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, (int(last) if isinstance(node, list) else last)


def rename_at(obj: dict, dotted: str, new_name: str) -> None:
    node, key = _parent(obj, dotted)
    node[new_name] = node.pop(key)


def set_at(obj: dict, dotted: str, value) -> None:
    node, key = _parent(obj, dotted)
    if isinstance(node, list) and key == len(node):
        node.append(value)
    else:
        node[key] = value


MISSPELLINGS = [  # (file, field, the field misspelled)
    ("stages/shard.yaml", "spec.entrypoint", "entrypiont"),
    ("stages/finetune.yaml", "metadata.labels", "lables"),
    ("base/raycluster.yaml", "spec.workerGroupSpecs.1.maxReplicas", "maxReplica"),
    ("base/raycluster.yaml", "spec.headGroupSpec.template.spec.containers.0.workingDir", "workingdir"),
    ("base/raycluster.yaml", "spec.workerGroupSpecs.1.template.spec.tolerations", "toleration"),
    ("schedule/raycronjob/raycronjob.yaml", "spec.schedule", "schedul"),
    ("schedule/cronjob/retrain-template.yaml", "spec.rayClusterSpec.enableInTreeAutoscaling", "enableInTreeAutoscalling"),
    ("schedule/cronjob/cronjob.yaml", "spec.jobTemplate.spec.template.spec.containers.0.command", "comand"),
    ("base/settings.yaml", "data", "dat"),
    ("overlays/example/settings.yaml", "metadata.name", "nmae"),
]


@pytest.mark.parametrize("relative, field, misspelled", MISSPELLINGS, ids=[f"{f}:{p}" for f, p, _ in MISSPELLINGS])
def test_a_misspelled_field_fails(relative, field, misspelled):
    obj = load(relative)
    assert ks.validation_errors(obj) == []
    rename_at(obj, field, misspelled)
    errors = ks.validation_errors(obj)
    assert any(misspelled in e for e in errors), errors


BROKEN_RULES = [  # (file, field, a value the API server or KubeRay's operator would reject, the error)
    ("base/raycluster.yaml", "spec.workerGroupSpecs.0.minReplicas", "zero", "not of type 'integer'"),
    ("base/raycluster.yaml", "spec.workerGroupSpecs.1.replicas", 5, "replicas outside"),
    ("base/raycluster.yaml", "spec.rayVersion", "2.9.0", "ray pin"),
    ("stages/shard.yaml", "metadata.generateName", "trim-" + "x" * 40 + "-", "at most 47"),
    ("stages/shard.yaml", "spec.suspend", True, "suspended"),
    ("stages/shard.yaml", "spec.ttlSecondsAfterFinished", 60, "ttlSecondsAfterFinished"),
    ("stages/shard.yaml", "spec.submissionMode", "HTTPMode", "K8sJobMode"),
    ("stages/shard.yaml", "kind", "RayJobs", "no KubeRay schema"),
    ("schedule/cronjob/retrain-template.yaml", "spec.clusterSelector", {"ray.io/cluster": "trim"}, "exactly one"),
    ("schedule/raycronjob/raycronjob.yaml", "spec.schedule", "every sunday", "cron"),
]


@pytest.mark.parametrize("relative, field, value, expected", BROKEN_RULES,
                         ids=[f"{f}:{p}" for f, p, _, _ in BROKEN_RULES])
def test_a_value_kuberay_would_reject_fails(relative, field, value, expected):
    obj = load(relative)
    set_at(obj, field, value)
    errors = ks.validation_errors(obj)
    assert any(expected in e for e in errors), errors


# --- entrypoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("label, obj", ray_jobs(), ids=[label for label, _ in ray_jobs()])
def test_entrypoint_runs_a_real_job_with_a_real_recipe(label, obj):
    assert ks.entrypoint_errors(ks.job_spec(obj)["entrypoint"], head_env(obj)) == []


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
    job = load("stages/shard.yaml")
    entrypoint = job["spec"]["entrypoint"]
    assert old in entrypoint and ks.entrypoint_errors(entrypoint, head_env(job)) == []
    errors = ks.entrypoint_errors(entrypoint.replace(old, new), head_env(job))
    assert any(expected in e for e in errors), errors


def test_the_retraining_runs_the_four_stages_in_order_under_a_new_run_name():
    template = load("schedule/cronjob/retrain-template.yaml")
    commands = job_commands(template)
    assert [job for job, _, _ in commands] == [f"jobs/{s}.py" for s in ks.STAGES]
    assert {recipe for _, recipe, _ in commands} == {"llava-1.5-7b"}
    # finetune and evaluate share the run name, which is the cluster's name: new for every run
    assert commands[2][2]["train.run_name"] == commands[3][2]["train.run_name"] == "trim-retrain-abcde-fghij"
    (env,) = [e for e in ks.head_container(cluster_of(template))["env"] if e["name"] == "TRIM_CLUSTER_NAME"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['ray.io/cluster']"


def test_the_entrypoints_fit_the_cluster_and_train_with_zero3():
    from pipelines.config import load_recipe

    checked = 0
    for label, obj in ray_jobs():
        gpus = gpu_capacity(cluster_of(obj))
        for job, recipe_name, overrides in job_commands(obj):
            recipe = load_recipe(recipe_name, [f"{k}={v}" for k, v in overrides.items()])
            assert recipe.paths.root == load("base/settings.yaml")["data"]["TRIM_ROOT"]
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

    settings = load("base/settings.yaml")["data"]
    recipes = {recipe for _, obj in ray_jobs() for _, recipe, _ in job_commands(obj)}
    for name in recipes:
        paths = load_recipe(name).paths
        assert settings["TRIM_CLIP_DIR"] == paths.clip
        assert settings["TRIM_LLM_DIR"] == paths.llm
        assert f"{settings['TRIM_PROJECTOR_DIR']}/mm_projector.bin" == paths.projector
    gpu_group = base_cluster()["spec"]["workerGroupSpecs"][1]
    (fetch,) = gpu_group["template"]["spec"]["initContainers"]
    assert '"$TRIM_PROJECTOR_REPO" mm_projector.bin --local-dir "$TRIM_PROJECTOR_DIR"' in fetch["args"][0]


def test_container_commands_use_only_variables_their_environment_defines():
    maps = configmaps([load("base/settings.yaml")])
    checked = 0
    for label, obj in all_objects():
        for node in ks.walk_dicts(obj):
            for container in node.get("containers", []) + node.get("initContainers", []):
                used = {v for arg in container.get("command", []) + container.get("args", [])
                        for v in ks.VAR.findall(arg)}
                assert used <= ks.container_env_names(container, maps), f"{label}: {container['name']}"
                checked += bool(used)
    assert checked >= 9  # the model fetchers of head, cpu and gpu groups, in three cluster specs


# --- settings and credentials ---------------------------------------------------------------------

def test_settings_and_credentials_come_by_reference():
    for label, obj in all_objects():
        for _, cluster in ks.cluster_specs(obj):
            for gpath, group in ks.groups(cluster):
                spec = group["template"]["spec"]
                for container in spec["containers"][:1] + spec.get("initContainers", []):
                    refs = {(k, v["name"]) for source in container["envFrom"] for k, v in source.items()}
                    assert refs == {("configMapRef", SETTINGS), ("secretRef", CREDENTIALS)}, f"{label} {gpath}"
                    assert container.get("workingDir", "/app") == "/app"
    kinds = [obj["kind"] for _, obj in all_objects()]
    assert "Secret" not in kinds, "credentials are created in the cluster, never kept in the repo"
    configmap_files = [label for label, obj in all_objects() if obj["kind"] == "ConfigMap"]
    assert configmap_files == ["base/settings.yaml#0", "overlays/example/settings.yaml#0"]  # the base and its patch
    assert load("base/settings.yaml")["metadata"]["name"] == SETTINGS
    assert f"create secret generic {CREDENTIALS}" in RUNBOOK.read_text()


def test_no_credential_anywhere():
    findings = []
    for label, obj in all_objects():
        findings += ks.credential_findings(obj, label)
    for path in [DOCKERFILE, DOCKERIGNORE, RUNBOOK, K8S / "submit_rayjob.py", *ks.manifest_files()]:
        findings += ks.text_credential_findings(path.read_text(), str(path.relative_to(ks.REPO)))
    assert findings == []


FAKE_KEY_ID = "AKIA" + "Q7TESTFAKE4EXAMP"  # built here, so that no scanner mistakes this file for a leak
FAKE_SECRET = "u8Zq" + "/FakeFakeFakeNotARealKey/0123456789ab"
FAKE_HF_TOKEN = "hf_" + "FakeFakeFakeFakeFakeFakeFakeFake12"
HEAD = "spec.headGroupSpec.template.spec.containers.0"

LITERAL_SECRETS = [  # (file, field, a credential written into it)
    ("base/raycluster.yaml", f"{HEAD}.env.1", {"name": "AWS_SECRET_ACCESS_KEY", "value": FAKE_SECRET}),
    ("base/settings.yaml", "data.AWS_ACCESS_KEY_ID", FAKE_KEY_ID),
    ("base/settings.yaml", "data.MLFLOW_TRACKING_URI", "https://alice:s3cr3t@mlflow.example.com"),
    ("base/settings.yaml", "kind", "Secret"),
    ("base/raycluster.yaml", "spec.headGroupSpec.rayStartParams.redis-password", "hunter2"),
    ("base/raycluster.yaml", "spec.workerGroupSpecs.1.template.spec.initContainers.0.args.0",
     f"hf download org/model --token {FAKE_HF_TOKEN}"),
    ("stages/shard.yaml", "spec.entrypoint", f"AWS_SECRET_ACCESS_KEY={FAKE_SECRET} python jobs/shard.py"),
]


@pytest.mark.parametrize("relative, field, value", LITERAL_SECRETS, ids=[f"{f}:{p}" for f, p, _ in LITERAL_SECRETS])
def test_a_literal_credential_fails(relative, field, value):
    obj = load(relative)
    assert ks.credential_findings(obj) == []
    set_at(obj, field, value)
    assert ks.credential_findings(obj) != []


# --- the schedule -----------------------------------------------------------------------------------

def test_both_schedules_run_the_same_job_on_a_copy_of_the_cluster():
    cluster = base_cluster()["spec"]
    template = load("schedule/cronjob/retrain-template.yaml")
    raycron = load("schedule/raycronjob/raycronjob.yaml")
    cronjob = load("schedule/cronjob/cronjob.yaml")
    assert template["spec"]["suspend"] is True, "KubeRay must never start the template itself"
    assert template["spec"]["rayClusterSpec"] == cluster, "retrain-template.yaml differs from raycluster.yaml"
    assert raycron["spec"]["jobTemplate"] == {k: v for k, v in template["spec"].items() if k != "suspend"}
    assert raycron["spec"]["schedule"] == cronjob["spec"]["schedule"]
    assert raycron["spec"]["timeZone"] == cronjob["spec"]["timeZone"]
    assert ks.cron_errors(cronjob["spec"]["schedule"]) == []
    assert template["spec"]["shutdownAfterJobFinishes"] is True


def test_the_cronjob_submitter_has_exactly_the_rbac_it_uses():
    cronjob = load("schedule/cronjob/cronjob.yaml")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    role = load("schedule/cronjob/rbac.yaml", "Role")
    binding = load("schedule/cronjob/rbac.yaml", "RoleBinding")
    account = load("schedule/cronjob/rbac.yaml", "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["get", "list", "create", "delete"]}]
    (container,) = pod["containers"]
    assert container["command"][0] == "python" and (ks.REPO / container["command"][1]).is_file()
    args = container["args"]
    assert args[args.index("--template") + 1] == load("schedule/cronjob/retrain-template.yaml")["metadata"]["name"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("submit_rayjob", K8S / "submit_rayjob.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_submitter_creates_a_valid_running_copy_of_the_template(submit):
    template = load("schedule/cronjob/retrain-template.yaml")
    run = submit.run_from_template(template)
    assert ks.validation_errors(run) == []
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
    template = load("schedule/cronjob/retrain-template.yaml")
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


# --- the image --------------------------------------------------------------------------------------

def test_the_dockerfile_installs_the_pinned_project_without_secrets():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(ks.pyproject_pin('torch'))}$", text, re.M)
    assert "pyproject.toml" in text and "--no-build-isolation" in text
    assert not re.search(r"^\s*(ARG|ENV)\s+\S*(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", text, re.M | re.I)
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "a numeric non-root user, for runAsNonRoot"
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    assert workdir == "/app"  # the manifests' workingDir: recipes name infra/deepspeed/... from there
    assert ks.pyproject_pin("ray") == base_cluster()["spec"]["rayVersion"]


def test_the_dockerignore_sends_only_what_the_image_needs():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] in ("*", "**"), "exclude everything, then allow what the image needs"
    allowed = {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "trim", "pipelines", "jobs", "recipes", "infra"} <= allowed


# --- the runbook ------------------------------------------------------------------------------------

def runbook_commands() -> list[str]:
    """The lines of the runbook's ```bash blocks, continuation lines joined, comments dropped."""
    lines, language = [], None
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            language = None if language is not None else line[3:].strip() or "-"
        elif language == "bash":
            lines.append(line)
    text = "\n".join(lines).replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_runbook_commands_name_real_files_and_flags():
    commands = runbook_commands()
    assert len(commands) >= 20
    paths = {m for c in commands for m in re.findall(r"(?<![\w/.-])(?:infra|jobs|recipes|docs)/[\w./-]*\w", c)}
    assert paths and [p for p in sorted(paths) if not (ks.REPO / p).exists()] == []
    jobs = [shlex.split(c[c.index("python jobs/"):]) for c in commands if "python jobs/" in c]
    assert {argv[1] for argv in jobs} >= {f"jobs/{s}.py" for s in ks.STAGES}
    assert [e for argv in jobs for e in ks.job_command_errors(argv)] == []
    for c in commands:
        for directory in re.findall(r"kubectl apply -k (\S+)", c):
            assert (ks.REPO / directory / "kustomization.yaml").is_file(), c
        for file in re.findall(r"kubectl (?:-n \S+ )?create -f ([^\s-]\S*)", c):
            assert (ks.REPO / file).is_file(), c
