# Two commands a fresh machine needs: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv gguf-converter test test-install test-all test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

# llama.cpp's converter (pure Python) from the llama-cpp-python sdist, fetched once into the cache:
# a download, never a compile. Offline, the GGUF tests skip and say how to fetch it.
gguf-converter: venv
	-$(PY) -c "from llmrank.exporters.gguf import converter_dir; print(converter_dir())"

# two workers (one per core; each test process runs torch on one thread), a test file per worker at a time,
# the longest files first (tests/conftest.py orders them; xdist would otherwise order files by test count)
test: venv gguf-converter
	$(PY) -m pytest -q -ra --durations=30 -n 2 --dist loadfile --no-loadscope-reorder -m "not extended and not install"

# a fresh venv with a plain `pip install .` runs the main job on empty caches (minutes; CI runs it after `make test`)
test-install: venv
	$(PY) -m pytest -q -ra -m install

test-all: venv gguf-converter
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow and not onnx and not extended and not install"

demo: venv
	$(PY) -m llmrank.demo

bench: venv
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
