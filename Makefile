# `make demo` and `make test` each do all set-up first (a .venv with torch 2.13.0 CPU, then the project).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_TRAIN_V2_ENABLED := 1
export RAY_USAGE_STATS_ENABLED := 0
# pip's wheel cache (DeepSpeed builds from source) stays with the project, not in ~/.cache: set-up writes nothing
# into the user's home. pip still reads the user's pip.conf (an index mirror, say).
export PIP_CACHE_DIR ?= $(CURDIR)/$(VENV)/pip-cache
# The demo's own Ray head, on ports of its own so it never meets another cluster on this machine, with a token
# of its own in its temporary folder: nothing is read from or written to ~/.ray.
DEMO_RAY_PORT ?= 6390
DEMO_DASHBOARD_PORT ?= 8275
# More `ray start` flags for the demo's head, and more `section.key=value` for its jobs.train (the tests run a
# tiny demo with every port of its own).
DEMO_RAY_FLAGS ?=
DEMO_OVERRIDES ?=
DEMO_RUNS := $(CURDIR)/runs
DEMO_DATA := $(DEMO_RUNS)/demo/builtin_data

.PHONY: setup test rehearsal demo serve bench clean

setup: $(STAMP)

# Rebuilt only when pyproject.toml changes; torch first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

test: setup
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(PY) -m pytest -q --durations=15

# Every scenario of the multi-node rehearsal (tests/rehearsal.py: a head with no CPUs, two worker nodes in mount
# namespaces of their own, S3 on 127.0.0.1; root and util-linux's unshare needed), then what they measured.
# The compact scenario (tests/test_rehearsal.py) is part of `make test` too.
rehearsal: setup
	rm -f runs/rehearsal/report.json
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(PY) -m pytest -q -m "rehearsal or integration" tests/test_rehearsal.py tests/test_rehearsal_full.py tests/test_rehearsal_serve.py tests/test_rehearsal_elastic.py tests/test_elastic.py --durations=0
	@cat runs/rehearsal/report.json

# A Ray token of the recipe's own, in the folder $(1) (what `ray get-auth-token --generate` writes to ~/.ray), for
# `ray start` and every client after it. RAY_AUTH_TOKEN, which would win over the file, is unset.
own_auth_token = (umask 077; $(PY) -c "import secrets; print(secrets.token_hex(32), end='')" >$(1)/auth_token); \
	export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(1)/auth_token; unset RAY_AUTH_TOKEN

# Stops the demo's head only (`ray stop` would also stop every other Ray on the machine) and removes its temporary
# folder. `ray start` runs in a session of its own (setsid), which every process of the head keeps, renamed workers
# and agents and the Ray client server too; the session id is the pid of `ray start`.
stop_demo_head = if [ -n "$${head:-}" ]; then \
	    pkill -TERM -s $$head || true; sleep 3; pkill -KILL -s $$head || true; fi; \
	rm -rf "$$temp"

# A real `ray job submit` round trip: start a local head, train, predict, stop that head only. Each demo is a
# fresh run: the previous demo's folder is removed first, since a run name that exists is resumed.
demo: setup
	@set -euo pipefail; export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	temp=$$(mktemp -d /tmp/arena-demo.XXXXXX); \
	trap '$(stop_demo_head)' EXIT; \
	$(call own_auth_token,$$temp); \
	setsid ray start --head --port=$(DEMO_RAY_PORT) --num-cpus=4 --dashboard-host=127.0.0.1 --temp-dir=$$temp \
	    --dashboard-port=$(DEMO_DASHBOARD_PORT) --disable-usage-stats $(DEMO_RAY_FLAGS) >/dev/null & head=$$!; \
	wait $$head; \
	export RAY_ADDRESS=http://127.0.0.1:$(DEMO_DASHBOARD_PORT); \
	for i in $$(seq 60); do ray job submit --no-wait -- true >/dev/null 2>&1 && break; sleep 2; done; \
	rm -rf $(DEMO_RUNS)/demo; \
	ray job submit --working-dir . -- python -m jobs.train --config configs/demo.yaml \
	    run.storage_path=$(DEMO_RUNS) $(DEMO_OVERRIDES); \
	checkpoint=$$($(PY) -c "import json; print(json.load(open('$(DEMO_RUNS)/demo/summary.json'))['best_checkpoint'])"); \
	ray job submit --working-dir . -- python -m jobs.predict --checkpoint $$checkpoint \
	    --input $(DEMO_DATA)/test.csv --output $(DEMO_RUNS)/demo/submission.csv; \
	$(PY) -c "import json; s = json.load(open('$(DEMO_RUNS)/demo/summary.json')); m = s['best_metrics']; \
	print(f\"\nvalidation log loss {m['valid_log_loss']:.4f} (uniform guess: 1.0986), accuracy {m['valid_accuracy']:.3f}\"); \
	print('checkpoint: ' + s['best_checkpoint']); print('submission: $(DEMO_RUNS)/demo/submission.csv'); \
	print('curves: $(VENV)/bin/tensorboard --logdir $(DEMO_RUNS)/demo/tracking --host 127.0.0.1')"

# The Ray Serve app (serve/config.yaml) on the demo's best checkpoint, on 127.0.0.1:$(SERVE_PORT), in a local
# Ray of its own with a token of its own (removed on exit); Ctrl-C stops it. Needs a finished `make demo`.
SERVE_PORT ?= 8000
serve: setup
	@set -euo pipefail; export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	test -f $(DEMO_RUNS)/demo/summary.json || { echo "no $(DEMO_RUNS)/demo/summary.json: run 'make demo' first" >&2; exit 1; }; \
	temp=$$(mktemp -d /tmp/arena-serve.XXXXXX); trap 'rm -rf "$$temp"' EXIT; \
	$(call own_auth_token,$$temp); \
	$(PY) -c "import json, yaml; best = json.load(open('$(DEMO_RUNS)/demo/summary.json'))['best_checkpoint']; \
	config = yaml.safe_load(open('serve/config.yaml')); config['http_options']['port'] = $(SERVE_PORT); \
	config['applications'][0]['args']['model'] = best; print('serving ' + best); \
	yaml.safe_dump(config, open('$(DEMO_RUNS)/demo/serve.yaml', 'w'), sort_keys=False)"; \
	echo "http://127.0.0.1:$(SERVE_PORT)/docs once ready (curl http://127.0.0.1:$(SERVE_PORT)/readyz)"; \
	serve run --address local $(DEMO_RUNS)/demo/serve.yaml

clean:
	rm -rf runs .pytest_cache
