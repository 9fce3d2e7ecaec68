"""Does TRIM keep what the question names? The grounding table and pictures (the paper's Fig. 2) for a CLIP
on held-out synthetic scenes, and what its patch features tell of each object (linear probes of colour,
shape and grid cell, studies/feature_probe.py).

    python jobs/grounding.py [--clip models/tiny-clip] [--out runs/grounding] [--cases 200] [--pictures 6]
                             [--probe-scenes 600]

Writes <out>/table.md, <out>/grounding.json, <out>/probe.json and <out>/pictures/<case>-<setting>.png
(left: the image as CLIP sees it, kept patches outlined; right: the scores), and ends with one
`RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.logs import setup_logging  # noqa: E402
from pipelines.pictures import online_pictures  # noqa: E402
from studies.feature_probe import probe  # noqa: E402
from studies.grounding import cases, markdown, measure, settings  # noqa: E402
from synthetic.scenes import render  # noqa: E402
from synthetic.tiny_models import shipped_clip  # noqa: E402
from trim.encoders import ClipEncoder  # noqa: E402

logger = logging.getLogger("jobs.grounding")
PICTURED = ("released sign, IQR", "paper sign, IQR")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="", help="CLIP checkpoint (default: the shipped models/tiny-clip)")
    parser.add_argument("--out", default="runs/grounding")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--pictures", type=int, default=6, help="cases drawn, for each sign")
    parser.add_argument("--probe-scenes", type=int, default=600, help="held-out scenes of the feature probes")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    encoder = ClipEncoder(args.clip or shipped_clip())
    items = cases(args.cases)
    rows = [{"setting": name, **measure(encoder, items, cfg)} for name, cfg in settings().items()]
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(rows) + "\n")
    (out / "grounding.json").write_text(json.dumps(rows, indent=1))
    configs = settings()
    for setting in PICTURED:
        tag = setting.split(",")[0].replace(" ", "-")
        shown = [(f"case{i:03d}-{tag}", render(c.scene), c.question) for i, c in enumerate(items[:args.pictures])]
        online_pictures(encoder, shown, configs[setting], out / "pictures")
    probes = probe(encoder, num_scenes=args.probe_scenes)
    (out / "probe.json").write_text(json.dumps(probes, indent=1))
    print(markdown(rows))
    logger.info("linear probes of the objects' patch features (held-out): %s", json.dumps(probes))
    logger.info("pictures in %s", out / "pictures")
    result = {}
    for r in rows[:4]:
        name = f"{r['setting'].split()[0]}_{'iqr' if 'IQR' in r['setting'] else 'ratio'}"  # e.g. released_iqr
        result.update({f"{key}_{name}": round(r[key], 3) for key in ("precision", "recall", "kept")})
    result["precision_random"] = round(rows[4]["precision"], 3)
    result.update({k: round(v, 3) for k, v in probes.items() if k.startswith("probe_")})
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
