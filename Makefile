# Everything a fresh machine needs: `make parity` (the main job) and `make test`.
# The virtual environment is built once; torch is installed first, pinned to the CPU wheel
# that lies on this machine's disk, so that the range in pyproject.toml installs nothing more.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: install demo test clean bench parity

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,plot]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m minilora.demo

# The parity suite: minilora vs the installed PEFT on the embedded GPT-2 (a few minutes on 2 cores).
parity: install
	$(BIN)/python -m parity $(ARGS)

# The forward-path benchmarks (10-15 min on a quiet 2-core CPU); `make bench ARGS=--quick` for a smoke run.
bench: install
	$(BIN)/python -m benchmarks $(ARGS)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
