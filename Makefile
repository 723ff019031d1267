# `make demo` and `make test` do all the set-up on a fresh machine (package registries only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build (see constraints.txt).
# The first `import rembg` compiles pymatting's numba code (~45 s): paid here, once.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[sdxl,dev]'
	$(PY) -c "import rembg"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bgwatch.demo

test: $(STAMP)
	$(PY) -m ruff check bgwatch tests bench
	$(PY) -m mypy bgwatch
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check bgwatch tests bench
	$(PY) -m mypy bgwatch

bench: $(STAMP)
	$(PY) bench/bench_cleanup.py

clean:
	rm -rf demo state inbox outbox .pytest_cache
