# The two commands of the README: `make demo` (main job) and `make test`. Both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/synth

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Main job: a freshly generated synthetic benchmark, every category trained and evaluated,
# results in ./memkd-store and a metrics table on stdout.
demo: $(STAMP)
	rm -rf $(DEMO_DATA)
	$(BIN)/memkd-ray data synth --out $(DEMO_DATA)
	$(BIN)/memkd-ray train --config configs/demo.yaml --data-root $(DEMO_DATA) --category all

# The tests marked slow (the demo's budget, detection quality on real photographs) run in CI
# (CI=true) and with `make test-all`; a plain `make test` leaves them out.
test: $(STAMP) lint
	$(BIN)/python -m pytest $(if $(filter true,$(CI)),,-m "not slow")

test-all: $(STAMP) lint
	$(BIN)/python -m pytest

# ruff, and the layer rules of docs/ARCHITECTURE.md (import-linter contracts in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/ray_overhead.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) $(DEMO_DATA) memkd-store
