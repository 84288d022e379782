# `make demo` and `make test` are the two commands a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench matrix soak tiny-model clean

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
	$(BIN)/python benchmarks/gate_parallelism.py

# The whole fault-injection matrix and the `extended` scenarios (~30 min on 2 cores). `make test` runs 3
# of the matrix's 21 scenarios (orchestrator killed during gate 1 and after an SFT checkpoint was written
# but not recorded, stage killed during gate 2), and of
# torchrun's: the 2-rank reference run and SIGKILL/resume; here also SIGTERM, timeout, a dead rank
# (retried and not), an error in rank 1, a SIGTERM to a two-node run; the DPO mid-stage resume; the
# parallel sweep on PostgreSQL.
matrix: install
	TRAINPIPE_FULL_MATRIX=1 $(BIN)/python -m pytest -q -rA tests/test_fault_matrix.py -m "not extended"
	TRAINPIPE_FULL_MATRIX=1 $(BIN)/python -m pytest -q -rA -m extended

# 100 random kills and resumes, then 8 concurrent runs on one ledger (~30-40 min on 2 cores).
soak: install
	$(BIN)/python benchmarks/soak.py --kills 100 --concurrent 8

# Rebuild the shipped built-in model and its SHA256SUMS (weights differ per CPU kernel: commit both).
tiny-model: install
	$(BIN)/python -m trainpipe.stages.tiny_model --write-assets

clean:
	rm -rf $(VENV) trainpipe-demo .pytest_cache
