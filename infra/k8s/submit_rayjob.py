"""Start one scheduled retraining: copy a suspended template RayJob into a new RayJob.

The fallback for clusters without KubeRay's RayCronJob (alpha, behind a feature gate): the Kubernetes
CronJob in infra/k8s/schedule/cronjob/ runs, in the project image,

    python infra/k8s/submit_rayjob.py --template trim-retrain-template

under the ServiceAccount trim-retrain-submitter. It reads the template (spec.suspend: true, so KubeRay
never starts it), starts nothing while an earlier run of it is still going, creates a RayJob
<template name without -template>-<random> with the template's spec and suspend off, then deletes
finished runs beyond the newest --keep. Standard library only; it talks to the API server with the
pod's ServiceAccount token and makes no call the Role in schedule/cronjob/rbac.yaml does not grant
(get, list, create and delete on rayjobs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TEMPLATE_LABEL = "trim-llava/template"
RUN_OF_LABEL = "trim-llava/run-of"
FINISHED = {"Complete", "Failed", "ValidationFailed"}
"""RayJob status.jobDeploymentStatus values after which nothing more happens."""


def run_from_template(template: dict) -> dict:
    """The RayJob to create: the template's spec with suspend off, labelled as a run of it."""
    meta = template["metadata"]
    labels = {k: v for k, v in meta.get("labels", {}).items() if k != TEMPLATE_LABEL}
    labels[RUN_OF_LABEL] = meta["name"]
    spec = copy.deepcopy(template["spec"])
    spec["suspend"] = False
    prefix = meta["name"].removesuffix("-template")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"generateName": f"{prefix}-", "labels": labels},
        "spec": spec,
    }


def is_finished(rayjob: dict) -> bool:
    return rayjob.get("status", {}).get("jobDeploymentStatus") in FINISHED


def runs_to_delete(runs: list[dict], keep: int) -> list[str]:
    """Names of the finished runs older than the newest `keep` finished ones."""
    finished = [r for r in runs if is_finished(r)]
    finished.sort(key=lambda r: r["metadata"]["creationTimestamp"], reverse=True)
    return [r["metadata"]["name"] for r in finished[keep:]]


class RayJobs:
    """The rayjobs collection of one namespace, reached with the pod's ServiceAccount."""

    def __init__(self, namespace: str | None = None) -> None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        self.namespace = namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip()
        self.url = f"https://{host}:{port}/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs"
        self.token = (SERVICE_ACCOUNT / "token").read_text().strip()
        self.tls = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))

    def call(self, method: str, name: str = "", body: dict | None = None, **query: str) -> dict:
        url = f"{self.url}/{name}" if name else self.url
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(
            url,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                     "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, context=self.tls, timeout=30) as response:
            return json.loads(response.read() or b"{}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True, help="name of the suspended template RayJob")
    parser.add_argument("--keep", type=int, default=5, help="finished runs to keep (default 5)")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="start a run even while an earlier one is still going")
    parser.add_argument("--namespace", help="default: the pod's own namespace")
    parser.add_argument("--dry-run", action="store_true", help="print the RayJob, create nothing")
    args = parser.parse_args(argv)

    jobs = RayJobs(args.namespace)
    try:
        template = jobs.call("GET", args.template)
        runs = jobs.call("GET", labelSelector=f"{RUN_OF_LABEL}={args.template}")["items"]
        active = [r["metadata"]["name"] for r in runs if not is_finished(r)]
        if active and not args.allow_overlap:
            print(f"not starting a run: {', '.join(sorted(active))} still going")
            return 0
        body = run_from_template(template)
        if args.dry_run:
            print(json.dumps(body, indent=2))
            return 0
        created = jobs.call("POST", body=body)
        print(f"created RayJob {created['metadata']['name']} in {jobs.namespace}")
        for name in runs_to_delete(runs, args.keep):
            jobs.call("DELETE", name)
            print(f"deleted finished RayJob {name}")
    except urllib.error.HTTPError as err:
        print(f"{err.code} {err.reason} from the API server: {err.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
