# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    generate an image with the embedded default model
#   make test   lint, type-check and run the test suite
# Both create .venv on first use and reuse it afterwards.

VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= a large red circle in the center on a white background
OUT ?= out/example.png

.PHONY: run test lint install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0: on the project's CPU machines that is the local CPU build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[service,worker,training,onnx,dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/hypersd generate --prompt "$(PROMPT)" --out "$(OUT)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest
