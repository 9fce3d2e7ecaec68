"""The deployment's other files, checked offline: no credential in any of them, settings and
credentials reach the pods by reference, the image installs the pinned project, and the runbook's
commands name files and flags that exist.
"""

from __future__ import annotations

import re
import shlex

import pytest

from . import k8s_credentials as cred
from . import k8s_entrypoints as ep
from . import k8s_schemas as sch
from . import k8s_support as ks

K8S = ks.K8S_DIR
RUNBOOK = ks.REPO / "docs" / "runbook.md"
DOCKERFILE = ks.REPO / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ks.REPO / "infra" / "docker" / "Dockerfile.dockerignore"
SETTINGS = "trim-settings"
CREDENTIALS = "trim-credentials"


# --- settings and credentials ---------------------------------------------------------------------

def test_settings_and_credentials_come_by_reference():
    for label, obj in ks.all_objects():
        for _, cluster in sch.cluster_specs(obj):
            for gpath, group in sch.groups(cluster):
                spec = group["template"]["spec"]
                for container in spec["containers"][:1] + spec.get("initContainers", []):
                    refs = {(k, v["name"]) for source in container["envFrom"] for k, v in source.items()}
                    assert refs == {("configMapRef", SETTINGS), ("secretRef", CREDENTIALS)}, f"{label} {gpath}"
                    assert container.get("workingDir", "/app") == "/app"
    kinds = [obj["kind"] for _, obj in ks.all_objects()]
    assert "Secret" not in kinds, "credentials are created in the cluster, never kept in the repo"
    configmap_files = [label for label, obj in ks.all_objects() if obj["kind"] == "ConfigMap"]
    assert configmap_files == ["base/settings.yaml#0", "overlays/example/settings.yaml#0"]  # the base and its patch
    assert ks.load("base/settings.yaml")["metadata"]["name"] == SETTINGS
    assert f"create secret generic {CREDENTIALS}" in RUNBOOK.read_text()


def test_no_credential_anywhere():
    findings = []
    for label, obj in ks.all_objects():
        findings += cred.credential_findings(obj, label)
    for path in [DOCKERFILE, DOCKERIGNORE, RUNBOOK, K8S / "submit_rayjob.py", *ks.manifest_files()]:
        findings += cred.text_credential_findings(path.read_text(), str(path.relative_to(ks.REPO)))
    assert findings == []


FAKE_KEY_ID = "AKIA" + "Q7TESTFAKE4EXAMP"  # built here, so that no scanner mistakes this file for a leak
FAKE_SECRET = "u8Zq" + "/FakeFakeFakeNotARealKey/0123456789ab"
FAKE_HF_TOKEN = "hf_" + "FakeFakeFakeFakeFakeFakeFakeFake12"
HEAD = "spec.headGroupSpec.template.spec.containers.0"

LITERAL_SECRETS = [  # (file, field, a credential written into it)
    ("base/raycluster.yaml", f"{HEAD}.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": FAKE_SECRET}]),
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
    obj = ks.load(relative)
    assert cred.credential_findings(obj) == []
    ks.set_at(obj, field, value)
    assert cred.credential_findings(obj) != []


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
    assert ks.pyproject_pin("ray") == ks.load("base/raycluster.yaml")["spec"]["rayVersion"]


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
    assert [e for argv in jobs for e in ep.job_command_errors(argv)] == []
    for c in commands:
        for directory in re.findall(r"kubectl apply -k (\S+)", c):
            assert (ks.REPO / directory / "kustomization.yaml").is_file(), c
        for file in re.findall(r"kubectl (?:-n \S+ )?create -f ([^\s-]\S*)", c):
            assert (ks.REPO / file).is_file(), c
