# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    serve the embedded default model on http://127.0.0.1:8000 (gateway + in-process worker)
#   make test   lint, type-check and run the test suite
# Both create .venv on first use and reuse it afterwards.

VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint install eval-base

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0: on the project's CPU machines that is the local CPU build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[service,worker,training,onnx,dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/hypersd serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# The base model's measured table in the README (500 fixed captions each).
EVAL := $(VENV)/bin/hypersd-train evaluate --model shapes-base --captions 500 --threads 1 --quiet
eval-base: $(VENV)/.installed
	$(VENV)/bin/hypersd-train evaluate --reference renders --out runs/eval/renders --quiet
	$(VENV)/bin/hypersd-train evaluate --reference reconstructions --vae models/shapes-base \
		--out runs/eval/reconstructions --quiet
	for g in 1.5 2 3 5; do $(EVAL) --steps 25 --guidance $$g --out runs/eval/base-25-g$$g; done
	for s in 1 2 4 8; do $(EVAL) --steps $$s --guidance 2 --out runs/eval/base-$$s-g2; done
	$(VENV)/bin/hypersd-train eval-summary runs/eval/renders runs/eval/reconstructions \
		runs/eval/base-25-g1.5 runs/eval/base-25-g2 runs/eval/base-25-g3 runs/eval/base-25-g5 \
		runs/eval/base-1-g2 runs/eval/base-2-g2 runs/eval/base-4-g2 runs/eval/base-8-g2
