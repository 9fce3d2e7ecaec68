"""Serve a fine-tuned model with TRIM: an OpenAI-compatible Ray Serve app (pipelines/serve/app.py).

    python jobs/serve.py --config infra/serve/tiny.yaml                  # blocks; Ctrl-C stops it
    python jobs/serve.py --config infra/serve/tiny.yaml --model DIR --set max_batch_size=8
    ray job submit --working-dir . -- python jobs/serve.py --config infra/serve/tiny.yaml --model s3://b/run/model
    serve run infra/serve/tiny.yaml                                      # the same config, Serve's own CLI

The config is a Ray Serve config file: its first application's `args` are ServeConfig's fields, its
`deployments` the per-deployment options, its `http_options` where to listen. --model replaces
args.model_dir ("recipe": the model the recipe's fine-tuning run wrote); --set overrides any arg.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml

REPO = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, REPO)

from pipelines.logs import setup_logging  # noqa: E402
from pipelines.serve.config import ServeConfig  # noqa: E402

logger = logging.getLogger("jobs.serve")


def parse_value(text: str):
    """A --set value as YAML reads it (numbers, booleans, [lists]), else the string."""
    return yaml.safe_load(text) if text else ""


def load(config: str, model: str | None, overrides: list[str], recipe: str) -> tuple[dict, ServeConfig, dict]:
    """(the Serve config file, the app's ServeConfig, its deployment options by name)."""
    spec = yaml.safe_load(Path(config).read_text())
    application = spec["applications"][0]
    args = dict(application.get("args", {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        args[key] = parse_value(value)
    if model == "recipe":
        from pipelines.config import load_recipe
        from pipelines.train.runs import resolve_run_name

        loaded = resolve_run_name(load_recipe(recipe, []))
        model = loaded.paths.model_dir(loaded.train.run_name)
    if model:
        args["model_dir"] = model
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments", [])}
    return spec, ServeConfig.from_dict(args), options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="infra/serve/tiny.yaml", help="a Ray Serve config file")
    parser.add_argument("--model", default=None, help="model directory to serve (local or s3://), or 'recipe'")
    parser.add_argument("--recipe", default="tiny", help="the recipe whose model --model recipe serves")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the app's args (ServeConfig's fields)")
    args = parser.parse_args(argv)
    setup_logging()
    spec, cfg, options = load(args.config, args.model, args.overrides, args.recipe)

    from ray import serve

    from pipelines.ray_cluster import init_ray
    from pipelines.serve.app import build

    # A local cluster's workers inherit this environment: they import this checkout's packages.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    init_ray()
    http = spec.get("http_options", {})
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": int(http.get("port", 8000))})
    application = spec["applications"][0]
    serve.run(build(cfg, options), name=application.get("name", "default"),
              route_prefix=application.get("route_prefix", "/"))
    logger.info("serving %s as %r on http://%s:%s", cfg.model_dir, cfg.model_name, http.get("host", "127.0.0.1"),
                http.get("port", 8000))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
