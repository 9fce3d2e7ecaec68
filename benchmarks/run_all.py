"""Run every benchmark (benchmarks/bench_*.py) one after the other, go on past one that fails, and end
with a summary: each benchmark's figures, its targets and whether they were met. Exits non-zero when a
benchmark failed (a non-zero exit or no RESULT line); a missed target is shown in the table, not an
error (the figures of a shared machine move from run to run).

    python benchmarks/run_all.py [--quick] [--only bench_trim,bench_shard] [-- extra args for each]

Each benchmark's output streams through as it runs (the summary repeats only the RESULT figures).
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Target:
    """One bar a RESULT figure is held to."""

    key: str
    """The RESULT key."""
    op: str
    """"<=", ">=" or ">"."""
    value: float
    """The bar."""

    def met(self, result: dict) -> bool | None:
        """Whether the figure clears the bar; None when the RESULT lacks it."""
        figure = result.get(self.key)
        if not isinstance(figure, int | float):
            return None
        return {"<=": operator.le, ">=": operator.ge, ">": operator.gt}[self.op](figure, self.value)

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.value:g}"


TARGETS: dict[str, list[Target]] = {
    "bench_shard": [Target("seconds", "<=", 60), Target("driver_rss_ratio", "<=", 1.2)],
    "bench_precompute": [Target("pipeline_over_raw", ">=", 0.85), Target("trim_over_floor", "<=", 1.5)],
    "bench_trim": [Target("trim_over_floor", "<=", 1.5)],
    "bench_zero3_build": [Target("zero3_build_peak_rss_over_share", "<=", 1.5)],
    "bench_serve": [Target("serve_over_answerer", ">=", 0.8), Target("mean_batch_size", ">", 1)],
    "bench_memory": [Target("precompute_wide_peak_mib", "<=", 4096), Target("shard_wide_peak_mib", "<=", 4096)],
    "bench_train": [Target("step_over_token_ratio", ">=", 0.9), Target("padding_share", "<=", 0.05),
                    Target("pipeline_over_deepspeed", ">=", 0.9)],
}
"""The bars of each benchmark (its docstring says why); information-only figures have none."""


ORDER = ["bench_trim", "bench_zero3_build", "bench_shard", "bench_memory", "bench_serve", "bench_train",
         "bench_precompute"]
"""The shortest first (minutes to tens of minutes on 2 cores), so a run cut short holds the most figures;
a benchmark not named here runs after them."""


def parse_result(output: str) -> dict | None:
    """The figures of the last `RESULT {json}` line of a benchmark's output; None without one."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


@dataclass
class Outcome:
    name: str
    seconds: float
    result: dict | None
    error: str = ""

    def status(self, targets: list[Target]) -> str:
        if self.error or self.result is None:
            return "FAILED"
        met = [t.met(self.result) for t in targets]
        return "met" if all(m is True for m in met) else "not met"


def run(script: Path, extra: list[str]) -> Outcome:
    """Run one benchmark, its output passed through as it comes."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(script), *extra], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    process.wait()
    seconds = time.perf_counter() - started
    output = "".join(lines)
    error = f"exit status {process.returncode}" if process.returncode else ""
    result = parse_result(output)
    if result is None and not error:
        error = "no RESULT line"
    return Outcome(script.stem, seconds, result, error)


def summary(outcomes: list[Outcome]) -> str:
    """The table: benchmark, figures, targets, met or not (one row per target, failures with why)."""
    rows = [("benchmark", "figures", "target", "met")]
    for outcome in outcomes:
        targets = TARGETS.get(outcome.name, [])
        if outcome.result is None:
            rows.append((outcome.name, f"FAILED ({outcome.error}) after {outcome.seconds:.0f} s", "", "no"))
            continue
        figures = ", ".join(f"{k}={v}" for k, v in outcome.result.items() if not isinstance(v, list | dict))
        if outcome.error:
            rows.append((outcome.name, f"FAILED ({outcome.error})", "", "no"))
        if not targets:
            rows.append((outcome.name, figures, "-", "-"))
        for number, target in enumerate(targets):
            met = target.met(outcome.result)
            rows.append((outcome.name if number == 0 else "", figures if number == 0 else "",
                         str(target), {True: "yes", False: "NO", None: "missing"}[met]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick form")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: every bench_*.py)")
    parser.add_argument("extra", nargs="*", help="after --: arguments passed to every benchmark")
    args = parser.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"), key=lambda s: (ORDER.index(s.stem) if s.stem in ORDER else len(ORDER),
                                                            s.stem))
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [s for s in scripts if s.stem in wanted]
    outcomes = []
    for script in scripts:
        print(f"== {script.stem} ({time.strftime('%H:%M:%S')})", flush=True)
        outcomes.append(run(script, [*(["--quick"] if args.quick else []), *args.extra]))
    print("\n== summary")
    print(summary(outcomes))
    failed = [o.name for o in outcomes if o.status(TARGETS.get(o.name, [])) == "FAILED"]
    missed = [o.name for o in outcomes if o.status(TARGETS.get(o.name, [])) == "not met"]
    if failed:
        print(f"failed: {', '.join(failed)}")
    if missed:
        print(f"targets not met: {', '.join(missed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
