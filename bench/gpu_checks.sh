#!/usr/bin/env bash
# Every GPU check of the project in one call, for a lent GPU machine (torch with CUDA present,
# no diffusers, no pydantic): issue 10's inference tables and issue 15's training-step table.
#
# Here, once per session: bash bench/gpu_wheels.sh   (the missing wheels, into .gpu-wheels/)
# Then, on the device (carry [".gpu-wheels"], timeout_s 600):
#   bash bench/gpu_checks.sh
# The tables land under $OUT (or ./gpu-results); commit them to bench/results/ with the card's
# name. Each step has its own time limit and prints its rows as it measures them, so a step that
# runs out of time keeps what it finished and the next step still runs; the limits add up to
# 540 s, leaving the rest of the 600 s call to the install.
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install --quiet --no-deps .gpu-wheels/*.whl || { echo "wheel install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# One step: its time limit, its table file, the command; its exit status goes to the summary
# (124: it ran out of time, keeping the rows it printed).
statuses=()
step() {
    local limit=$1 table=$2
    shift 2
    timeout "$limit" "$@" | tee "$out/$table"
    statuses+=("$table: exit ${PIPESTATUS[0]}")
}
# inference: 1-step text->image, eager fp16 and compile (+CUDA graphs), batch 1 and 4, beside
# the FLOP floor (TensorRT only where installed); one architecture per step
step 150 gpu-sd15.md python3 -m bench.gpu --archs sd15 --backends eager,compile --batch-sizes 1,4
step 240 gpu-sdxl.md python3 -m bench.gpu --archs sdxl --backends eager,compile --batch-sizes 1,4
# training: one TSCD, one feedback and one DMD step of an SDXL-architecture model, 1024², batch 2,
# bf16, time per step and peak memory
step 150 gpu-training.md python3 -m bench.gpu_training
printf '%s\n' "${statuses[@]}" | tee "$out/statuses.txt"
