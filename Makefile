# The two entry points a newcomer needs; both set up .venv first.
#   make demo   build a random base-size checkpoint with transformers, convert it
#               to bt-jax and print the parity report against PyTorch. Then
#               build the sample photos as a TFDS dataset and print its
#               statistics, run the quickstart notebook on them with a tiny
#               random checkpoint and save its figure, and train a small model
#               from scratch on the sample photos and write its report and curves.
#   make test   lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: setup demo test lint

setup: $(VENV)/.installed

# torch==2.13.0 is installed first so that pip takes the CPU wheel on disk instead
# of resolving a multi-gigabyte CUDA build for the [torch] extra.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[torch,dev]'
	touch $@

demo: setup
	$(BIN)/python -m convert init-random --config configs/base.py --head itm --overwrite $(DEMO_DIR)/pytorch
	$(BIN)/python -m convert to-jax --overwrite $(DEMO_DIR)/pytorch $(DEMO_DIR)/jax
	$(BIN)/python -m convert verify $(DEMO_DIR)/pytorch --jax $(DEMO_DIR)/jax --text-length 40
	$(BIN)/python -m convert init-random --config configs/sample.py --head mlm+itm+itc --processor --overwrite $(DEMO_DIR)/sample-pytorch
	$(BIN)/python -m convert to-jax --overwrite $(DEMO_DIR)/sample-pytorch $(DEMO_DIR)/sample-jax
	$(BIN)/python -m bt_jax.data samples $(DEMO_DIR)/data --tokenizer $(DEMO_DIR)/sample-jax --overwrite
	BT_JAX_CHECKPOINT=$(abspath $(DEMO_DIR))/sample-jax BT_JAX_FIGURE=$(abspath $(DEMO_DIR))/quickstart.png \
		$(BIN)/python notebooks/execute.py notebooks/quickstart.ipynb $(DEMO_DIR)/quickstart.ipynb
	rm -rf $(DEMO_DIR)/train
	$(BIN)/python -m train --config configs/demo.py --workdir $(DEMO_DIR)/train

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Two workers, one test file each at a time (files share module fixtures): most
# of the suite is single-threaded compiling, so the 2 cores halve its time.
# Files start in collection order, which tests/conftest.py sets slowest first.
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder
