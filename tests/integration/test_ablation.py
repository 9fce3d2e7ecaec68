"""The miniature ablation's quick form, end to end (the full one is `python jobs/ablation.py --recipe tiny`)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_ablation_writes_its_table_and_result(tmp_path):
    done = subprocess.run([sys.executable, "jobs/ablation.py", "--recipe", "tiny", "--quick",
                           "--set", f"paths.root={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for key in ("accuracy_full", "accuracy_trim", "accuracy_trim_no_aggregate", "accuracy_uniform",
                "accuracy_random", "accuracy_trim_other_sign", "chance", "mean_visual_tokens_trim"):
        assert 0 <= result[key] <= (576 if key.startswith("mean") else 1), key
    assert result["mean_visual_tokens_full"] == 576
    assert result["seeds"] == 1 and result["accuracy_trim_std"] == 0.0
    assert "trim seed 0: accuracy" in done.stdout  # the studies' progress lines reach the log
    table = (tmp_path / "ablation-quick" / "table.md").read_text().splitlines()
    rows = [line.split("|")[1].strip() for line in table[2:]]
    assert rows[:6] == ["full", "trim", "trim_no_aggregate", "uniform", "random", "trim_other_sign"]
    saved = json.loads((tmp_path / "ablation-quick" / "results.json").read_text())
    assert [r["row"] for r in saved["rows"]] == rows[:6]
    assert [[s["seed"] for s in r["per_seed"]] for r in saved["rows"]] == [[0]] * 6
    assert all(r["per_seed"][0]["loss_curve"][-1][0] == saved["config"]["steps"] for r in saved["rows"])
    assert (tmp_path / "mlflow.db").exists()
