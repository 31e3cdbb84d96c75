#!/usr/bin/env bash
# Every GPU check of the project in one call, for a lent GPU machine (torch with CUDA present,
# no diffusers): issue 10's inference table and issue 15's training-step table.
#
# Here, once per session (the wheels are ignored by git and travel with `carry`):
#   echo /.gpu-wheels/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps -d .gpu-wheels diffusers transformers peft accelerate \
#       safetensors huggingface-hub tokenizers onnx
# Then, on the device (carry [".gpu-wheels"]):
#   bash bench/gpu_checks.sh        # (timeout_s 600) tables under $OUT (or ./gpu-results), commit them to
#                                   # bench/results/ with the card's name
set -euo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
python -m pip install --quiet --no-deps .gpu-wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# inference: 1-step text->image, SD1.5 512² and SDXL 1024², eager fp16 and compile (+CUDA
# graphs), batch 1 and 4, beside the FLOP floor (TensorRT only where installed)
timeout 330 python -m bench.gpu --backends eager,compile --batch-sizes 1,4 | tee "$out/gpu.md"
# training: one TSCD, one feedback and one DMD step of an SDXL-architecture model, 1024², batch 2,
# bf16, time per step and peak memory
timeout 240 python -m bench.gpu_training | tee "$out/gpu-training.md"
