"""The code's structure, checked from its imports: no module of the packages takes part in an import
circle (deferred imports inside functions count too), and the contracts in pyproject.toml
([tool.importlinter]) hold. `make lint` runs the same contracts through lint-imports."""

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("trim", "pipelines", "synthetic", "studies")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _graph() -> grimp.ImportGraph:
    sys.path.insert(0, str(REPO))
    return grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)


def test_no_module_takes_part_in_an_import_circle():
    assert _cycles(_graph()) == []


def test_a_circle_is_found():
    graph = _graph()
    graph.add_import(importer="trim.config", imported="trim.core")  # trim.core imports trim.config
    assert ["trim.config", "trim.core"] in _cycles(graph)


def test_the_import_contracts_hold():
    done = subprocess.run([sys.executable, "-m", "importlinter.cli", "--no-cache"], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0 and "No module named importlinter.cli" in done.stderr:
        done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=REPO,
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout
