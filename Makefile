PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py csrc/jpeg_region.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python pipelines/pretrain.py --config configs/demo.yaml
	$(BIN)/python pipelines/finetune.py --config configs/finetune_demo.yaml
	$(BIN)/python pipelines/finetune.py --config configs/finetune_demo.yaml model.checkpoint=null \
		run.name=demo_finetune_random_init
	$(BIN)/python pipelines/linprobe.py --config configs/linprobe_demo.yaml
	$(BIN)/python pipelines/results.py runs/demo_finetune runs/demo_finetune_random_init runs/demo_linprobe

# two pytest workers (pytest-xdist), each with its own local Ray cluster: a run's start-up
# leaves a core idle about a quarter of the time; tests/conftest.py groups the modules
# (tests/xdist_compat.py)
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=15 tests

# the inner loop: every test not marked slow (no end-to-end run)
test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m "not slow" --durations=10 tests

clean:
	rm -rf $(VENV) .demo_data
