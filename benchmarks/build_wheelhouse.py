"""Build the wheels DeepSpeed needs on a GPU node that has torch and transformers but no DeepSpeed and
no network, small enough to travel beside the working tree.

    python benchmarks/build_wheelhouse.py [--out .whl] [--python-version 3.12] [--check]

DeepSpeed ships as a source archive only: it is built here into a pure-Python wheel (DS_BUILD_OPS=0,
no compiled op; the few a run needs are compiled just in time where a compiler is, and the engine's
optimizer is torch's AdamW, which needs none). Beside it go DeepSpeed's requirements that such a node
lacks (CARRIED), each at the version installed here, binary wheels for the node's Python and this
one's. The folder gets a requirements.txt naming exactly those, so the node installs them alone,
without resolving torch:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ds \
        --find-links .whl -r .whl/requirements.txt && PYTHONPATH=/tmp/ds python3 benchmarks/gpu_check.py ...

`--check` does that here, on a copy of this environment without DeepSpeed, its lacking requirements,
Ray and MLflow (as the node is), and runs the engine section of `gpu_check.py --tiny` with it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = "deepspeed"
CARRIED = ("hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
"""What DeepSpeed needs beside itself on the GPU node: the requirements (and theirs) its image lacks,
and typing-extensions, which it has but perhaps older than pydantic's minimum (4.16; a newer one serves
every other user). The image has DeepSpeed's other requirements (einops, msgpack, ninja, numpy,
packaging, psutil, py-cpuinfo, torch, tqdm: docs/gpu.md)."""
NODE_ABSENT_MODULES = ("deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
                       "ray", "mlflow")
"""Top-level modules hidden from the copy of this environment that --check runs in."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 60.0
"""What may travel beside the working tree, wheels included."""


def pip(*args: str, env: dict | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def build(out: Path, python_versions: list[str]) -> list[str]:
    """The wheels in `out`; returns the requirement lines (name==version) of requirements.txt."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.whl"):
        stale.unlink()
    version = importlib.metadata.version(DEEPSPEED)
    # The sdist's setup.py imports torch: built against this environment's, no isolation; no op compiled.
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary", DEEPSPEED, "-w", str(out),
        f"{DEEPSPEED}=={version}", env={**os.environ, "DS_BUILD_OPS": "0"})
    pins = [f"{DEEPSPEED}=={version}"] + [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for python in python_versions:
        pip("download", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            *platforms, "-d", str(out), *pins[1:])
    wheel = next(out.glob(f"{DEEPSPEED}-*.whl"))
    if not wheel.name.endswith("-py3-none-any.whl"):
        raise RuntimeError(f"{wheel.name}: the DeepSpeed wheel is not pure Python (was an op compiled?)")
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    return pins


def size_mib(out: Path) -> float:
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20


def node_like_site(folder: Path) -> Path:
    """This environment's site-packages as links, less NODE_ABSENT_MODULES and their metadata."""
    site = Path(sysconfig.get_paths()["purelib"])
    hidden = {m.lower() for m in NODE_ABSENT_MODULES}
    folder.mkdir()
    for entry in site.iterdir():
        top = entry.name.split("-")[0].lower().replace(".py", "")
        if top in hidden or top.replace("_", "-") in hidden or entry.suffix == ".pth":
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def check(out: Path) -> dict:
    """Install the wheelhouse as the node would into a temporary target and run the engine section of
    gpu_check.py --tiny on a copy of this environment without DeepSpeed; returns its RESULT."""
    # A fixed target and a torch_extensions folder of its own: DeepSpeed's CPU shared-memory op is
    # compiled once for this target, and the build cached for this environment's DeepSpeed is untouched.
    work = Path(tempfile.gettempdir(), "trim-wheelhouse-check")
    target = work / "target"
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-check-") as tmp:
        pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(target),
            "--find-links", str(out), "-r", str(out / "requirements.txt"))
        site = node_like_site(Path(tmp, "site"))
        env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{site}", "CUDA_VISIBLE_DEVICES": "",
               "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions")}
        # -S: no site-packages of this environment, only what PYTHONPATH names.
        where = subprocess.run([sys.executable, "-S", "-c", "import deepspeed; print(deepspeed.__file__)"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        if not where.startswith(str(target)):
            raise RuntimeError(f"deepspeed was imported from {where}, not from the wheelhouse's target")
        for absent in ("ray", "mlflow"):
            probe = subprocess.run([sys.executable, "-S", "-c", f"import {absent}"], env=env, capture_output=True)
            if probe.returncode == 0:
                raise RuntimeError(f"{absent} is importable in the node-like environment")
        proc = subprocess.run([sys.executable, "-S", str(REPO / "benchmarks" / "gpu_check.py"), "--tiny",
                               "--only", "engine"], cwd=REPO, env=env, capture_output=True, text=True)
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"gpu_check.py --tiny --only engine failed (exit {proc.returncode})")
        result = json.loads(lines[-1][len("RESULT "):])
        if result["errors"]:
            raise RuntimeError(f"the engine section failed with the wheelhouse's DeepSpeed: {result['errors']}")
        return {"deepspeed_from": where, **{k: v for k, v in result.items() if k.startswith("engine_")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".whl", help="the wheelhouse folder (git-ignored)")
    parser.add_argument("--python-version", action="append", default=None,
                        help="Python of the node (repeatable; default 3.12, the GPU image's, and this one's)")
    parser.add_argument("--check", action="store_true", help="install it into a node-like copy of this "
                                                             "environment and run gpu_check.py --tiny --only engine")
    args = parser.parse_args(argv)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    versions = sorted(set(args.python_version or ["3.12", here]))
    pins = build(args.out, versions)
    mib = size_mib(args.out)
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {mib:.1f} MiB in {args.out}: {', '.join(pins)}")
    if mib > LIMIT_MIB:
        raise SystemExit(f"the wheelhouse is {mib:.1f} MiB, over the {LIMIT_MIB:.0f} MiB that may travel")
    result = {"wheelhouse_mib": round(mib, 2), "wheels": sorted(p.name for p in args.out.glob("*.whl"))}
    if args.check:
        result.update(check(args.out))
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
