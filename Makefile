# `make demo` and `make test` do all the set-up on a fresh machine (package registries only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# torch first, pinned by constraints.txt (its one torch line, so the two never disagree): an unpinned
# torch pulls a multi-GB CUDA build. rembg 2.0.86 needs Python 3.11+: say so before pip does.
# The first `import rembg` compiles pymatting's numba code (~45 s): paid here, once.
TORCH_PIN := $(shell grep -E '^torch==' constraints.txt)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "bgwatch needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1) (make PYTHON=python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt '$(TORCH_PIN)'
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
