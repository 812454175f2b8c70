# The only entry point: CI and the README call these targets and nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint typecheck check bench docs proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Install the CPU build of torch first when none is importable: an unpinned torch
	# would pull a CUDA build of several GB.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev,tensorboard,hivemind,hf,wandb,plots,kernels]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diloco-island --config configs/demo.yaml

# One torch thread per process: the multi-process tests run several islands on 2 cores, and
# oversubscribed OpenMP threads spin, making them many times slower.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow and not gpu" -q

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check diloco islands tests bench examples tools
	$(BIN)/ruff format --check diloco islands tests bench examples tools

typecheck: $(STAMP)
	$(BIN)/mypy diloco islands

# What CI runs (.ci/run) and the README's test command: lint, format, types, then the tests.
check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python bench/baselines.py

docs: $(STAMP)
	$(BIN)/python -m diloco.config.docs > docs/config.md
	$(BIN)/python tools/include_examples.py docs/plugins.md

# The grpc transport's generated modules, from diloco/transports/grpc/coordinator.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
		diloco/transports/grpc/coordinator.proto

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache
