# Two commands: `make demo` and `make test`. Each sets up its own virtual environment first.
# On a GPU machine pick a CUDA torch: `make demo TORCH="torch==2.13.0 --index-url <your CUDA index>"`
# or install torch into .venv yourself before the first `make`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
UV = $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode --constraint $(VENV)/constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint setup clean-demo

# torch comes from pip, which reads the machine's pip configuration (where its CPU wheel lies);
# everything else from uv, which fetches in parallel: 28 s instead of pip's 89 s here (2-core
# Xeon; bytecode compiled by both, as some machines set PYTHONDONTWRITEBYTECODE). uv reads no
# pip configuration, so the torch just installed is its constraint: it never trades it for
# another build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip uv
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/constraints.txt
	$(UV) -e '.[dev,quality]'
	# taming-transformers, without its dependencies (it would pull torchvision and Lightning 1.x):
	# only the test that checks our taming checkpoint import against taming's own VQGAN uses it
	$(UV) --no-deps taming-transformers==0.0.1
	touch $@

setup: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The suite's command lines (`python train.py ...`, the stages an experiment starts, the ranks
# Lightning re-launches or spawns) start warm: forked from one process that imported the
# libraries once (tests/warm_python.py); LIGHTNING_MIA_TEST_COLD=1 starts every one cold.
# The tests run one torch thread each: TEST_WORKERS pytest-xdist workers keep the cores busy
# (a module's tests stay on one worker, the longest modules first: tests/conftest.py; the
# session's tiny experiments are built once for all). Three workers on two cores: many tests
# wait on processes they start (DDP rendezvous, a stage killed at a point), and a third worker
# fills those waits (AVX2 kernels, 2-core Xeon: 392 s with 3 workers, 423 s with 2, 416 s with 4).
TEST_WORKERS ?= 3
# The fast tier waits on no process: a third worker only adds its own start (each worker
# imports torch, Lightning and diffusers, ~14 s of one core) to 2 cores (AMD EPYC, AVX2, alone:
# 103 s with 2 workers, 111 s with 3 in the checkout; 120 s and 137 s in a fresh clone).
TEST_FAST_WORKERS ?= 2

test: $(VENV)/.installed lint
	WANDB_MODE=disabled $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test-fast: $(VENV)/.installed   # every module's logic on random-weight tiny parts, no training runs
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow" -n $(TEST_FAST_WORKERS) --dist loadscope --no-loadscope-reorder

demo: $(VENV)/.installed
	$(PY) -m lightning_mia.experiment demo

clean-demo:
	rm -rf runs/demo
