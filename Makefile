# medpipe: the two commands are `make demo` and `make test`. Both set up .venv first when needed.
.DEFAULT_GOAL := help
# GPU=1: a separate .venv-gpu from requirements-gpu.lock (TensorFlow with CUDA), e.g. `make setup GPU=1`
VENV := $(if $(filter 1,$(GPU)),.venv-gpu,.venv)
LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,requirements.lock)
BIN := $(VENV)/bin
STAMP := $(VENV)/.medpipe-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: help setup system-deps demo test test-fast bench lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

$(STAMP): $(LOCK) pyproject.toml scripts/setup.sh
	GPU=$(if $(filter 1,$(GPU)),1,0) bash scripts/setup.sh

setup: $(STAMP)  ## create .venv (GPU=1: .venv-gpu with CUDA TensorFlow) from the lock (a no-op when nothing changed)

demo: setup  ## ingest -> train -> evaluate -> publish -> serve -> predict on the sample in sample_data/
	$(BIN)/medpipe demo --output demo_output

test: setup system-deps  ## the whole test suite
	$(BIN)/python -m pytest tests

system-deps:  ## Debian packages the integration tests run for real (Prometheus, Orthanc, Chromium, PostgreSQL...)
	@bash scripts/install_system_deps.sh || echo "make: system packages not installed (needs root/apt); their tests will skip"

test-fast: setup  ## the suite without the slow end-to-end tests
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup  ## every benchmark (needs ../shared/data); figures go to benchmarks/results/ and BENCHMARKS.md
	$(BIN)/python benchmarks/run_all.py

lock: setup  ## re-pin requirements.lock from the current .venv
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(tensorflow-serving-api|medpipe)==' > requirements.lock.new
	@echo "review requirements.lock.new, keep its header from requirements.lock, then move it into place"

clean:  ## remove demo output and caches (keeps .venv)
	rm -rf demo_output .pytest_cache
