# The README's commands. Each target creates .venv on first use and installs the package into it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch + torchvision first: these exact releases are on the local disk of the project's machines.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/zr demo

bench: $(STAMP)
	$(BIN)/python benchmarks/t2i_memory.py

lint: $(STAMP)
	$(BIN)/ruff check zr_diffusion tests benchmarks
	$(BIN)/ruff format --check zr_diffusion tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
