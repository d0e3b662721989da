# Two commands from a fresh clone:  `make run`  (the whole service)  and  `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build; the default is the CPU
# wheel this kind of machine keeps on disk, so no multi-GB CUDA build is downloaded.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck openapi clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[worker,local,dev]" -e "./client[pil]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/imagegen serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

openapi: $(STAMP)
	$(BIN)/imagegen openapi

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
