# Set-up and the two jobs the README names. `make demo` and `make test` each install into .venv
# first (once; again when pyproject.toml changes). torch and torchvision are pinned to the
# releases on this machine's local disk, so nothing large is downloaded.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off torch==2.14.1 torchvision==0.29.1 -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/knnflow build-index digits --overwrite
	$(BIN)/knnflow bench exact --quick

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

lint: $(STAMP)
	$(BIN)/ruff check .
