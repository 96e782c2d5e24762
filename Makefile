# Set-up and the two jobs the README names. `make demo` and `make test` each install into .venv
# first (once; again when pyproject.toml changes). torch and torchvision are pinned to the
# releases on this machine's local disk, so nothing large is downloaded.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint cli-docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off --no-cache-dir torch==2.14.1 torchvision==0.29.1 -e ".[dev]"
	# torchcfm and flow_matching for the adapter tests, tensorboard for train --tensorboard;
	# their tests skip where the registry lacks them.
	$(BIN)/pip install --progress-bar off --no-cache-dir -e ".[interop,tensorboard]" \
		&& $(BIN)/pip install --progress-bar off --no-cache-dir --no-deps torchcfm \
		|| echo "torchcfm/flow_matching/tensorboard not installed: their tests will skip"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded digits: index, a short knn-efm training run (about 1.5 minutes
# on 2 CPU cores), samples, their memorization report, and the exact-engine check table.
demo: $(STAMP)
	$(BIN)/knnflow build-index digits --overwrite
	$(BIN)/knnflow train digits --target knn-efm --index indices/digits-train --steps 600 \
		--log-every 100 --name runs/demo --overwrite
	$(BIN)/knnflow sample runs/demo --n 64 --overwrite
	$(BIN)/knnflow memorization runs/demo/samples --index indices/digits-train --overwrite
	$(BIN)/knnflow bench exact --quick
	@echo
	@echo "Pictures: runs/demo/samples/grid.png (64 samples),"
	@echo "          runs/demo/samples-memorization/histogram.png and nearest.png (memorization)."

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

lint: $(STAMP)
	$(BIN)/ruff check .

# docs/cli.md from the typer app (tests/test_cli.py checks that it is current).
cli-docs: $(STAMP)
	$(BIN)/python tests/cli_docs.py > docs/cli.md
