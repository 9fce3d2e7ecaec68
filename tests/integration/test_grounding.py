"""The grounding job end to end on a few cases (the full one is `python jobs/grounding.py`)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_grounding_writes_its_table_probes_pictures_and_result(tmp_path):
    out = tmp_path / "grounding"
    done = subprocess.run([sys.executable, "jobs/grounding.py", "--out", str(out), "--cases", "8", "--pictures", "1",
                           "--probe-scenes", "60"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for key in ("precision_paper_iqr", "recall_paper_iqr", "precision_random", "probe_colour", "probe_shape",
                "probe_cell"):
        assert 0 <= result[key] <= 1, key
    rows = json.loads((out / "grounding.json").read_text())
    assert [r["setting"] for r in rows][:2] == ["released sign, IQR", "paper sign, IQR"]
    probes = json.loads((out / "probe.json").read_text())
    assert probes["probe_colour"] == result["probe_colour"] and probes["objects"] > 60
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["case000-paper-sign.png",
                                                                     "case000-released-sign.png"]
    assert "| paper sign, IQR |" in (out / "table.md").read_text()
