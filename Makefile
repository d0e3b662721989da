# Two commands from a fresh clone:  `make run`  (the whole service)  and  `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build; the default is the CPU
# wheel this kind of machine keeps on disk, so no multi-GB CUDA build is downloaded.
# Every other package is installed at the exact version requirements.lock names (the last
# green run); `make lock` refreshes it on purpose, from the ranges in pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
STAMP := $(VENV)/.installed
EXTRAS := -e ".[worker,local,dev]" -e "./client[pil]"
# Bytecode is written by the first process that imports a module, not by pip for every file it
# installs (torch alone has thousands no process here imports): `--no-compile` below saves about
# a minute of a fresh install. That needs Python free to write it, even where the environment
# says not to (CI images often set PYTHONDONTWRITEBYTECODE): else every worker process the
# tests start would compile torch and diffusers again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test test-s3 docs openapi lock clean

# The tests that move images, inputs and control maps, run a second time with S3 object storage
# (moto's server) in place of Redis; `make test-s3` runs every e2e test that way (~10 min).
# (A worker killed with its images stored but not recorded: test_object_storage, in every run.)
S3_TESTS := tests/e2e/test_images_in.py tests/e2e/test_adapters_http.py \
	tests/e2e/test_reliability.py::test_expired_image_says_it_expired

$(STAMP): pyproject.toml client/pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile --constraint $(LOCK) $(EXTRAS)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/imagegen serve

# The suite, with ruff, mypy, lint-imports, mkdocs and the S3 rerun beside it (tests/run.sh).
test: $(STAMP)
	tests/run.sh $(S3_TESTS)

test-s3: $(STAMP)
	TESTS_STORAGE=s3 $(BIN)/pytest tests/e2e

# The docs site on http://127.0.0.1:8001, rebuilt as its pages change.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

openapi: $(STAMP)
	$(BIN)/imagegen openapi

# Resolve pyproject.toml's ranges afresh in a scratch venv and write what pip chose. Run
# `make test` after it: a lock is only worth committing once the suite passed on it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install --quiet $(EXTRAS)
	{ echo "# Exact versions of the last green run; refresh with 'make lock' (torch: TORCH_SPEC)."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^torch=='; } > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock .run .pytest_cache .mypy_cache .ruff_cache
