# One command each: `make demo` installs and runs the demo; `make test` installs and runs the tests;
# `make bench` runs the CPU benchmark (README, Benchmarks).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-gpu bench clean

install:
	./scripts/install.sh

demo: install
	$(VENV)/bin/rectrain demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m trainer bench --config configs/bench_dlrm.toml --nproc 2 --steps 30 --warmup 10

test-gpu: install
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf runs .pytest_cache
