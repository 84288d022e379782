# `make demo` and `make test` are the two commands a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-gpu check-gpu-constraints check-gpu-constraints-pypi libmin test-libmin demo test docs bench matrix soak tiny-model clean

install: $(VENV)/.installed

# torch goes in first, pinned by constraints.txt to the local CPU build: an unpinned torch would
# pull several GB of CUDA wheels when a dependency asks for it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# GPU machines: the library set unsloth 2026.10.9 accepts (trl 1.15, transformers 5.17, datasets 4.x),
# from constraints-gpu.txt; constraints.txt pins the newer CPU/CI set, which unsloth refuses.
install-gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints-gpu.txt -e ".[unsloth,dev]"
	touch $(VENV)/.installed

# That the GPU set resolves (--dry-run: no GPU needed, nothing installed). CI runs it with this
# machine's pip settings (~1.7 min here); the -pypi variant resolves as a GPU machine sees PyPI, CUDA
# torch with its nvidia and triton pins included (2-9 min here, most of it network).
check-gpu-constraints: install
	$(BIN)/pip install --dry-run --ignore-installed -q -c constraints-gpu.txt -e ".[unsloth]"

check-gpu-constraints-pypi: install
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= \
		$(BIN)/pip install --dry-run --ignore-installed -q -c constraints-gpu.txt -e ".[unsloth]"

# A second environment with the GPU set's trl/transformers/datasets on CPU torch, without unsloth
# (which needs CUDA to import): what a GPU user runs, minus the GPU.
LIBMIN ?= .venv-libmin
$(LIBMIN)/.installed: pyproject.toml constraints-gpu.txt
	$(PYTHON) -m venv $(LIBMIN)
	$(LIBMIN)/bin/pip install -q -c constraints-gpu.txt torch
	$(LIBMIN)/bin/pip install -q -c constraints-gpu.txt -e ".[dev]"
	touch $@

libmin: $(LIBMIN)/.installed

# The quickstart end to end (gate 3 passing), a SIGKILL/resume, the stage cache, gates 1 and 2 rejecting,
# on that set (CI runs it beside `make test`; a subset, to keep CI under 20 min).
LIBMIN_TESTS ?= "tests/test_resume.py::test_sigkill_after_sft_then_resume_reuses_sft[sqlite]" \
	tests/test_sources.py::test_hub_dataset_loads_by_id_offline_with_subset_split_and_revision \
	tests/test_sources.py::test_preference_shapes_train_dpo \
	"tests/test_sources.py::test_sharegpt_and_alpaca_train_to_the_same_tokens_and_loss_mask_as_messages" \
	tests/test_cache.py::test_fingerprint_follows_settings_data_and_upstream \
	tests/test_gates.py::test_diverging_learning_rate_gives_nan_and_gate1_rejects \
	tests/test_gates.py::test_merged_weights_tampered_after_the_merge_fail_equivalence
# `extended` scenarios CI shows here, beside the main suite, rather than on its critical path: the
# plain-TRL script does trainpipe's work on the same resolved config; a resumed attempt reuses its
# tokenized data; a kill mid output rename, then a resume from the stage's final checkpoint; the
# quickstart end to end on torch's scalar `default` CPU kernel (the main suite runs it on `avx2`).
LIBMIN_EXTENDED ?= "tests/test_e2e.py::test_quickstart_cli_end_to_end[default]" \
	tests/test_benchmark_parity.py \
	tests/test_data_cache.py::test_resumed_attempt_reuses_tokenized_data_and_ends_bit_identical \
	tests/test_fault_matrix.py::test_killed_between_the_steps_of_the_output_rename_resumes_bit_identical
test-libmin: libmin
	$(LIBMIN)/bin/python -m pytest -q --durations=0 --basetemp=$(CURDIR)/.pytest-libmin $(LIBMIN_TESTS)
	TRAINPIPE_FULL_MATRIX=1 $(LIBMIN)/bin/python -m pytest -q --durations=0 --basetemp=$(CURDIR)/.pytest-libmin-x \
		$(LIBMIN_EXTENDED)

demo: install
	$(BIN)/trainpipe demo

test: install
	$(BIN)/python -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/. --strict: a broken link or anchor, or a page
# missing from the nav, fails the build. The configuration reference and the state-machine diagrams are
# generated from the code by the hooks in docs/hooks/.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

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
	rm -rf $(VENV) $(LIBMIN) trainpipe-demo .pytest_cache site
