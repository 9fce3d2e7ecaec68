"""Every benchmark's quick form (`--quick`: small sizes, a few steps, the same code path) runs to its end
and prints a RESULT line that parses and holds the figures the benchmark promises and `make bench`'s
summary holds it to. No timing is asserted. benchmarks/gpu_check.py --tiny has its own test
(tests/unit/test_gpu_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import run_all  # noqa: E402

QUICK = {
    "bench_shard": (["--naive"], ["seconds", "driver_peak_rss_mb", "driver_rss_ratio", "seconds_big",
                                  "speedup_over_naive"]),
    "bench_precompute": ([], ["pipeline_over_raw", "pipeline_over_raw_repeats", "pipeline_images_per_s",
                              "raw_images_per_s", "driver_peak_rss_mb", "cache_bytes_ratio", "trim_over_floor",
                              "trim_speedup"]),
    "bench_trim": ([], ["trim_over_floor", "trim_speedup", "reference_s", "vectorized_s"]),
    "bench_zero3_build": ([], ["zero3_build_peak_rss_over_share", "without_zero_init_peak_rss_over_share",
                               "zero3_engine_peak_rss_over_share", "partitioned_at_build", "params", "share_mb"]),
    "bench_train": ([], ["step_ratio", "token_ratio", "step_over_token_ratio", "padding_share",
                         "pipeline_over_deepspeed", "pipeline_over_deepspeed_repeats",
                         "pipeline_over_deepspeed_full", "deepspeed_ratio", "bare_ratio"]),
    "bench_serve": ([], ["questions_per_s_trim", "questions_per_s_full", "serve_over_answerer", "p50_latency_s",
                         "p95_latency_s", "mean_batch_size"]),
    "bench_memory": ([], ["shard_wide_peak_mib", "precompute_wide_peak_mib", "shard_ordinary_peak_mib",
                          "precompute_ordinary_peak_mib", "shard_wide_over_ordinary", "precompute_wide_over_ordinary"]),
}
"""Benchmark -> (extra arguments of its quick run, the RESULT keys it promises)."""
TAKES_WORKDIR = {"bench_shard", "bench_precompute", "bench_zero3_build", "bench_train"}
TAKES_ROOT = {"bench_memory"}


def test_every_benchmark_has_a_quick_run_here():
    assert set(QUICK) == {p.stem for p in (REPO / "benchmarks").glob("bench_*.py")}
    assert set(run_all.TARGETS) <= set(QUICK) == set(run_all.ORDER)


@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_form_prints_its_result(name, tmp_path):
    extra, keys = QUICK[name]
    args = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", *extra]
    if name in TAKES_WORKDIR:
        args += ["--workdir", str(tmp_path / "work")]
    if name in TAKES_ROOT:
        args += ["--root", str(tmp_path / "work")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "TRIM_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("RESULT ")  # the last line, as make bench reads it
    result = run_all.parse_result(proc.stdout)
    assert result is not None
    missing = [k for k in keys if k not in result]
    assert not missing, f"{name} RESULT lacks {missing}: {result}"
    for target in run_all.TARGETS.get(name, []):  # every figure the summary holds to a bar is a number
        assert target.met(result) is not None, target
    for key in keys:
        value = result[key]
        if isinstance(value, bool):
            continue
        values = value if isinstance(value, list) else [value]
        assert values and all(isinstance(v, int | float) and v >= 0 for v in values), (key, value)


def test_summary_marks_targets_and_failures():
    outcomes = [run_all.Outcome("bench_trim", 3.0, {"trim_over_floor": 1.2, "trim_speedup": 20.0}),
                run_all.Outcome("bench_shard", 5.0, {"seconds": 70.0, "driver_rss_ratio": 1.0}),
                run_all.Outcome("bench_train", 9.0, None, "exit status 1"),
                run_all.Outcome("bench_zero3_build", 2.0, {"params": 10})]
    statuses = [o.status(run_all.TARGETS[o.name]) for o in outcomes]
    assert statuses == ["met", "not met", "FAILED", "not met"]
    table = run_all.summary(outcomes).splitlines()
    assert table[0].split() == ["benchmark", "figures", "target", "met"]
    row = {line.split()[0]: line for line in table[1:] if line.startswith("bench_")}
    assert row["bench_trim"].rstrip().endswith("yes") and "trim_over_floor <= 1.5" in row["bench_trim"]
    assert row["bench_shard"].rstrip().endswith("NO")  # seconds 70 > 60
    assert "FAILED (exit status 1)" in row["bench_train"]
    assert row["bench_zero3_build"].rstrip().endswith("missing")


def test_run_all_goes_past_a_failing_benchmark(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_broken.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "bench_fine.py").write_text("print('RESULT ' + __import__('json').dumps({'x': 1.0}))\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    assert run_all.main([]) == 1
    out = capsys.readouterr().out
    lines = out[out.index("== summary"):].splitlines()
    assert any(line.startswith("bench_broken") and "FAILED (exit status 3)" in line for line in lines)
    assert any(line.startswith("bench_fine") and "x=1.0" in line for line in lines)
    assert "failed: bench_broken" in out


def test_peak_rss_is_the_process_own_not_its_parents():
    """A child started by spawn or subprocess inherits its parent's ru_maxrss on Linux: a benchmark
    reading that in a rank would report the parent's peak (bench_zero3_build once read 1.99 for 1.45)."""
    block = bytearray(300 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touched, so this process's peak holds it
    del block
    code = ("import resource, sys; sys.path.insert(0, 'benchmarks'); import common; "
            "print(common.peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                                               text=True, check=True).stdout.split())
    assert inherited > 300  # what ru_maxrss says: the parent's peak
    assert own < 150  # a Python with psutil imported
