# Two commands for a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.iosd-core
STAMP  := $(VENV)/.iosd-installed

.PHONY: install mmcv demo test lint bench clean protocol2

install: $(STAMP)

# torch first and pinned (CPU machines here carry a local 2.13.0 wheel), then iosd itself and
# the real CLIP BPE vocabulary (open_clip_torch, without its torchvision dependency). This is
# all the demo needs: the shapes world has exact masks, no teacher.
$(CORE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

# mmcv (built with ops from source, cached) and mmdet for the Mask R-CNN teacher: the tests need it.
$(STAMP): $(CORE) scripts/install-mmcv.sh
	scripts/install-mmcv.sh $(BIN)/python
	touch $@

mmcv:
	scripts/install-mmcv.sh $(BIN)/python

demo: $(CORE)
	PATH=$(abspath $(BIN)):$$PATH scripts/demo.sh

# GD's Protocol II on the CPU world: head on seen shapes -> iosd-synth the unseen ones -> MMSeg
# segmenter trained on them, scored on exact-mask images next to its exact-mask upper bound.
protocol2: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/protocol2.py $(PROTOCOL2_ARGS)

test: install
	$(BIN)/ruff check .
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/gen.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/tasks.py

clean:
	rm -rf $(VENV) runs reports shards/*/ .pytest_cache
