# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    serve the Shapes models on http://127.0.0.1:8000 (gateway + in-process workers)
#   make test   lint, type-check, check the import layers and run the test suite
# Both create .venv on first use and reuse it afterwards.

VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# What `make run` serves in one process: the distilled Shapes models and their teacher (the
# playground's compare view shows them side by side); a request naming none gets the default.
SHAPES_MODELS := ["shapes-hyper-1step", "shapes-hyper-2step", "shapes-hyper-4step", "shapes-hyper-8step", "shapes-base"]

.PHONY: run test lint install fuzz chaos eval-base eval-final distill-shapes ship-shapes table screenshot \
	dmd2-shapes dmd-2step-shapes dmd2-2step-shapes tscd-edge-shapes

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0: on the project's CPU machines that is the local CPU build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[gateway,worker,training,onnx,dev]"
	# tests/test_fid_inception.py's independent reference; --no-deps: its torchvision requirement
	# pulls a CUDA torch, and the extractor it is compared against needs neither.
	$(PY) -m pip install --quiet --no-deps "torch-fidelity==0.4.0"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	HYPERSD_EMBEDDED_MODELS='$(SHAPES_MODELS)' $(VENV)/bin/hypersd serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile

test: lint
	$(VENV)/bin/pytest

# Fuzz proof: schemathesis against the live spec of a real gateway + worker + Redis (>= 2,000
# requests; the test suite runs a short version, tests/test_serving_fuzz.py).
fuzz: $(VENV)/.installed
	$(PY) -m bench.fuzz --max-examples 250 --out bench/results/fuzz-cpu.md

# Chaos proof: kill -9 workers and restart Redis under load; every accepted job must end.
chaos: $(VENV)/.installed
	$(PY) -m bench.chaos --jobs 300 --rate 10 --steps 4 --out bench/results/chaos-cpu.md

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

# The Hyper-SD pipeline on the Shapes base model, one stage after the other (each resumable):
# TSCD 8->4->2->1, the LCM-LoRA baseline, the alignment reward network, feedback (on the unified
# 1-step LoRA, then one per N-step LoRA sampling with its own N steps), DMD for 1 step, and DMD2
# for 2 steps over the TSCD and feedback LoRAs just trained (its config alone starts from the
# shipped copies, as the ablation's runs did).
TRAIN := $(VENV)/bin/hypersd-train
distill-shapes: $(VENV)/.installed
	$(TRAIN) tscd --config training/configs/tscd-shapes.yaml
	$(TRAIN) lcm --config training/configs/lcm-shapes.yaml
	test -f models/shapes-alignment/model.safetensors || \
		$(TRAIN) attributes --config training/configs/alignment.yaml
	$(TRAIN) feedback --config training/configs/feedback-shapes.yaml
	for k in 2 4 8; do $(TRAIN) feedback --config training/configs/feedback-shapes.yaml \
		"start_loras=[runs/tscd-shapes/k$$k/shapes-hyper-$${k}step.safetensors]" sampler_steps=$$k \
		out_dir=runs/feedback-$${k}step export_name=shapes-hyper-feedback-$${k}step; done
	$(TRAIN) dmd --config training/configs/dmd-shapes.yaml
	$(TRAIN) dmd --config training/configs/dmd2-2step-shapes.yaml \
		"start_loras=[runs/tscd-shapes/k2/shapes-hyper-2step.safetensors,runs/feedback-2step/shapes-hyper-feedback-2step.safetensors]" \
		"anchor_loras=[runs/tscd-shapes/k8/shapes-hyper-8step.safetensors,runs/feedback-8step/shapes-hyper-feedback-8step.safetensors]"

# Copy the distilled LoRAs from runs/ into models/ (fp16 diffusers files; registry.toml names them).
SHIP := $(PY) -m training.lora_export
ship-shapes: $(VENV)/.installed
	for k in 1 2 4 8; do $(SHIP) runs/tscd-shapes/k$$k/shapes-hyper-$${k}step.safetensors \
		models/shapes-hyper/tscd-$${k}step.safetensors; done
	$(SHIP) runs/feedback-shapes/shapes-hyper-feedback.safetensors models/shapes-hyper/feedback.safetensors
	for k in 2 4 8; do $(SHIP) runs/feedback-$${k}step/shapes-hyper-feedback-$${k}step.safetensors \
		models/shapes-hyper/feedback-$${k}step.safetensors; done
	$(SHIP) runs/dmd-shapes/shapes-hyper-dmd.safetensors models/shapes-hyper/dmd.safetensors
	$(SHIP) runs/dmd2-2step-shapes/shapes-hyper-dmd2-2step.safetensors \
		models/shapes-hyper/dmd-2step.safetensors
	$(SHIP) runs/lcm-shapes/lcm/shapes-lcm.safetensors models/shapes-hyper/lcm.safetensors

# The paper's table (README): teacher, LCM, TSCD, + feedback, + DMD at 1/2/4/8 steps.
table: $(VENV)/.installed
	$(TRAIN) table --config training/configs/table-shapes.yaml

# Final numbers on held-out caption set 3 (read by no training or selection step): the teacher and
# the shipped Hyper-SD models, judged by the attribute network and by the geometric judge.
FINAL := $(VENV)/bin/hypersd-train evaluate --captions 500 --caption-set 3 --threads 1 --quiet
eval-final: $(VENV)/.installed
	$(FINAL) --model shapes-base --steps 25 --guidance 2 --out runs/eval-final/shapes-base
	for k in 1 2 4 8; do $(FINAL) --model shapes-hyper-$${k}step --out runs/eval-final/hyper-$${k}step; done
	$(VENV)/bin/hypersd-train eval-summary runs/eval-final/shapes-base runs/eval-final/hyper-1step \
		runs/eval-final/hyper-2step runs/eval-final/hyper-4step runs/eval-final/hyper-8step

# The playground's screenshots for the README (a real headless browser on the embedded server).
screenshot: $(VENV)/.installed
	HYPERSD_SCREENSHOTS=docs $(VENV)/bin/pytest -q tests/test_page.py

# Issue 14's levers for sharper 1- and 2-step models, one run each (resumable; compare them on
# caption sets 1-2 only, docs/distillation.md): DMD2's GAN term, DMD (and DMD2) for 2 steps, and TSCD with
# the sampler's own jump drawn more often.
dmd2-shapes: $(VENV)/.installed
	$(TRAIN) dmd --config training/configs/dmd2-shapes.yaml
dmd-2step-shapes: $(VENV)/.installed
	$(TRAIN) dmd --config training/configs/dmd-2step-shapes.yaml
dmd2-2step-shapes: $(VENV)/.installed
	$(TRAIN) dmd --config training/configs/dmd2-2step-shapes.yaml
tscd-edge-shapes: $(VENV)/.installed
	$(TRAIN) tscd --config training/configs/tscd-edge-shapes.yaml
