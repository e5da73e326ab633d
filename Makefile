# `make demo` and `make test` each do all set-up first (a .venv with torch 2.13.0 CPU, then the project).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_TRAIN_V2_ENABLED := 1
export RAY_USAGE_STATS_ENABLED := 0
# The demo's own Ray head, on ports of its own so it never meets another cluster on this machine.
DEMO_RAY_PORT ?= 6390
DEMO_DASHBOARD_PORT ?= 8275
DEMO_RUNS := $(CURDIR)/runs
DEMO_DATA := $(DEMO_RUNS)/demo/builtin_data

.PHONY: setup test demo bench clean

setup: $(STAMP)

# Rebuilt only when pyproject.toml changes; torch first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

test: setup
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(PY) -m pytest -q

# A real `ray job submit` round trip: start a local head, train, predict, stop that head only
# (`ray stop` would also stop every other Ray on the machine). Each demo is a fresh run: the previous demo's
# folder is removed first, since a run name that exists is resumed.
demo: setup
	@set -euo pipefail; export PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_AUTH_MODE=token; \
	temp=$$(mktemp -d /tmp/arena-demo.XXXXXX); \
	ray start --head --port=$(DEMO_RAY_PORT) --num-cpus=4 --dashboard-host=127.0.0.1 --temp-dir=$$temp \
	    --dashboard-port=$(DEMO_DASHBOARD_PORT) --disable-usage-stats >/dev/null; \
	trap 'pkill -TERM -f -- "$$temp" || true; sleep 3; pkill -KILL -f -- "$$temp" || true; rm -rf "$$temp"' EXIT; \
	export RAY_ADDRESS=http://127.0.0.1:$(DEMO_DASHBOARD_PORT); \
	for i in $$(seq 60); do ray job submit --no-wait -- true >/dev/null 2>&1 && break; sleep 2; done; \
	rm -rf $(DEMO_RUNS)/demo; \
	ray job submit --working-dir . -- python -m jobs.train --config configs/demo.yaml \
	    run.storage_path=$(DEMO_RUNS); \
	checkpoint=$$($(PY) -c "import json; print(json.load(open('$(DEMO_RUNS)/demo/summary.json'))['best_checkpoint'])"); \
	ray job submit --working-dir . -- python -m jobs.predict --checkpoint $$checkpoint \
	    --input $(DEMO_DATA)/test.csv --output $(DEMO_RUNS)/demo/submission.csv; \
	$(PY) -c "import json; s = json.load(open('$(DEMO_RUNS)/demo/summary.json')); m = s['best_metrics']; \
	print(f\"\nvalidation log loss {m['valid_log_loss']:.4f} (uniform guess: 1.0986), accuracy {m['valid_accuracy']:.3f}\"); \
	print('checkpoint: ' + s['best_checkpoint']); print('submission: $(DEMO_RUNS)/demo/submission.csv')"

clean:
	rm -rf runs .pytest_cache
