# hvdllm: `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
NP ?= 2
PYTHON := $(VENV)/bin/python
HVDLLM := $(VENV)/bin/hvdllm

.PHONY: install test test-unit test-parallel test-multihost demo bench clean

install:
	@bash scripts/install.sh

test: install
	@bash scripts/test.sh

test-unit: install
	@bash scripts/test.sh unit

test-parallel: install
	@bash scripts/test.sh parallel

test-multihost: install
	@bash scripts/test.sh multihost

demo: install
	@bash scripts/demo.sh

bench: install
	@bash benchmarks/run_all.sh

clean:
	rm -rf runs/ .pytest_cache test-results/
