# `make demo` and `make test` are the two commands a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch goes in first, pinned by constraints.txt to the local CPU build: an unpinned torch would
# pull several GB of CUDA wheels when a dependency asks for it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: install
	$(BIN)/trainpipe demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) trainpipe-demo .pytest_cache
