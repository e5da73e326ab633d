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

.PHONY: setup test demo serve bench clean

setup: $(STAMP)

# Rebuilt only when pyproject.toml changes; torch first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

test: setup
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(PY) -m pytest -q --durations=15

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

# The Ray Serve app (serve/config.yaml) on the demo's best checkpoint, on 127.0.0.1:$(SERVE_PORT), in a local
# Ray of its own; Ctrl-C stops it. Needs a finished `make demo`.
SERVE_PORT ?= 8000
serve: setup
	@set -euo pipefail; export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	test -f $(DEMO_RUNS)/demo/summary.json || { echo "no $(DEMO_RUNS)/demo/summary.json: run 'make demo' first" >&2; exit 1; }; \
	$(PY) -c "import json, yaml; best = json.load(open('$(DEMO_RUNS)/demo/summary.json'))['best_checkpoint']; \
	config = yaml.safe_load(open('serve/config.yaml')); config['http_options']['port'] = $(SERVE_PORT); \
	config['applications'][0]['args']['model'] = best; print('serving ' + best); \
	yaml.safe_dump(config, open('$(DEMO_RUNS)/demo/serve.yaml', 'w'), sort_keys=False)"; \
	echo "http://127.0.0.1:$(SERVE_PORT)/docs once ready (curl http://127.0.0.1:$(SERVE_PORT)/readyz)"; \
	serve run --address local $(DEMO_RUNS)/demo/serve.yaml

clean:
	rm -rf runs .pytest_cache
