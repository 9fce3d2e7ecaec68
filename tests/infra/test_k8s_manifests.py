"""The manifests in infra/k8s, checked offline: each parses, validates against the schemas of
Kubernetes and KubeRay (and KubeRay's own rules), and the overlays render, through kustomize, into
valid objects with their image, settings and schedule. Broken copies must fail: a misspelled field,
a value KubeRay rejects, a broken overlay. No cluster is needed; the overlay tests need kubectl
(tests/infra/install_kubectl.py installs it) and skip without it.
"""

from __future__ import annotations

import re

import pytest
import yaml

from . import k8s_credentials as cred
from . import k8s_entrypoints as ep
from . import k8s_schemas as sch
from . import k8s_support as ks

K8S = ks.K8S_DIR
OVERLAY = K8S / "overlays" / "example"
SETTINGS = "trim-settings"


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
        job = ks.load(f"stages/{stage}.yaml")
        # generateName: each `kubectl create -f` starts a new run of this stage, and only of this one
        assert job["metadata"]["generateName"] == f"trim-{stage}-" and "name" not in job["metadata"]
        assert [j for j, _, _ in ep.job_commands(job)] == [f"jobs/{stage}.py"]


# --- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, obj", ks.all_objects(), ids=[label for label, _ in ks.all_objects()])
def test_manifest_validates(label, obj):
    assert sch.validation_errors(obj) == []


# --- overlays, rendered by kustomize -------------------------------------------------------------

OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SCHEDULED_KIND = {"cronjob": "CronJob", "raycronjob": "RayCronJob"}


@pytest.fixture(scope="module")
def kustomize():
    """Skips the test where no kubectl with kustomize v5 is installed (ks.kubectl() says why)."""
    path, why_not = ks.kubectl()
    if path is None:
        pytest.skip(why_not)


def with_schedule(kustomization: dict, schedule: str) -> dict:
    """The kustomization with its one schedule/ resource swapped for schedule/<schedule>."""
    resources = [re.sub(r"schedule/\w+$", f"schedule/{schedule}", r) for r in kustomization["resources"]]
    assert sum("schedule/" in r for r in resources) == 1, "one schedule: schedule/cronjob or schedule/raycronjob"
    return {**kustomization, "resources": resources}


def schedule_patch(kustomization: dict) -> str:
    (op,) = [op for p in kustomization["patches"] if "patch" in p for op in yaml.safe_load(p["patch"])
             if op["path"] == "/spec/schedule"]
    return op["value"]


def overlay_errors(overlay, intended: dict, rendered: dict) -> list[str]:
    """What is wrong with the objects kustomize renders from `rendered`, the kustomization of
    `overlay` (or a broken copy of it): an invalid object, a credential, or an image, settings or
    schedule other than the ones `intended` (the shipped kustomization) sets."""
    try:
        objects = ks.render(overlay, rendered)
    except ks.KustomizeError as err:
        return [str(err)]
    errors = [e for o in objects for e in sch.validation_errors(o) + cred.credential_findings(o, ks.object_id(o))]
    (image,) = intended["images"]
    images = {c["image"] for o in objects for node in ks.walk_dicts(o)
              for c in node.get("containers", []) + node.get("initContainers", [])}
    if images != {f"{image['newName']}:{image['newTag']}"}:
        errors.append(f"not every pod runs the overlay's image: {sorted(images)}")
    (settings_patch,) = [ks.load_yaml(overlay / p["path"])[0] for p in intended["patches"] if "path" in p]
    if ks.configmaps(objects).get(SETTINGS, {}).get("data") != {**ks.load("base/settings.yaml")["data"],
                                                              **settings_patch["data"]}:
        errors.append(f"{SETTINGS}: not the base settings updated by the overlay's {settings_patch['data']}")
    (variant,) = [r.rsplit("/", 1)[1] for r in intended["resources"] if "schedule/" in r]
    scheduled = [(o["kind"], o["spec"].get("schedule")) for o in objects if o["metadata"].get("name") == "trim-retrain"]
    if scheduled != [(SCHEDULED_KIND[variant], schedule_patch(intended))]:
        errors.append(f"trim-retrain: not one {SCHEDULED_KIND[variant]} on the overlay's schedule: {scheduled}")
    return errors


@pytest.mark.parametrize("schedule", sorted(SCHEDULED_KIND))
@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_an_overlay_renders_valid_manifests_with_its_image_bucket_and_schedule(kustomize, overlay, schedule):
    kustomization = with_schedule(ks.load_yaml(overlay / "kustomization.yaml")[0], schedule)
    (settings_patch,) = [ks.load_yaml(overlay / p["path"])[0] for p in kustomization["patches"] if "path" in p]
    assert "TRIM_ROOT" in settings_patch["data"], "the overlay names its bucket"
    value = schedule_patch(kustomization)
    assert sch.cron_errors(value) == []
    # a schedule of its own, so that the check below tells whether the patch applied
    assert value != ks.load(f"schedule/{schedule}/{schedule}.yaml")["spec"]["schedule"]
    assert overlay_errors(overlay, kustomization, kustomization) == []


def _misspell_schedule_path(k):
    return {**k, "patches": [{**p, "patch": p["patch"].replace("/spec/schedule", "/spec/schedul")} if "patch" in p
                             else p for p in k["patches"]]}


BROKEN_OVERLAYS = {  # how the kustomization is broken, and what the errors then say
    "schedule patch on a misspelled path": (_misspell_schedule_path, "'schedul'"),
    "schedule patch matching nothing": (
        lambda k: {**k, "patches": [{**p, "target": {"name": "trim-retrian"}} if "target" in p else p
                                    for p in k["patches"]]}, "overlay's schedule"),
    "settings patch left out": (lambda k: {**k, "patches": [p for p in k["patches"] if "path" not in p]},
                                SETTINGS),
    "image of another name": (lambda k: {**k, "images": [{**k["images"][0], "name": "trim-lava"}]},
                              "overlay's image"),
    "the base twice": (lambda k: {**k, "resources": k["resources"] + ["../../base"]}, "already registered"),
}


@pytest.mark.parametrize("case", BROKEN_OVERLAYS, ids=list(BROKEN_OVERLAYS))
def test_a_broken_overlay_fails(kustomize, case):
    breaks, expected = BROKEN_OVERLAYS[case]
    kustomization = ks.load_yaml(OVERLAY / "kustomization.yaml")[0]
    errors = overlay_errors(OVERLAY, kustomization, breaks(kustomization))
    assert any(expected in e for e in errors), errors


# --- broken copies of the manifests fail --------------------------------------------------------

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
    obj = ks.load(relative)
    assert sch.validation_errors(obj) == []
    ks.rename_at(obj, field, misspelled)
    errors = sch.validation_errors(obj)
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
    obj = ks.load(relative)
    ks.set_at(obj, field, value)
    errors = sch.validation_errors(obj)
    assert any(expected in e for e in errors), errors
