#!/usr/bin/env bash
# The wheels that the lent GPU machine lacks, into .gpu-wheels/ (ignored by git; `carry` takes it
# there, and bench/gpu_checks.sh installs it with --no-deps). That machine's Python 3.12 has torch,
# transformers, huggingface-hub, tokenizers, safetensors, accelerate, peft, onnx, numpy, pillow,
# pyyaml, scipy and tqdm (/work/.library/device/KINDS.md), but neither diffusers nor pydantic
# (which the registry needs). Versions are this checkout's own, so the code runs against what
# it was tested with; pydantic-core is compiled, so it is fetched for CPython 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .gpu-wheels
exclude="$(git rev-parse --git-path info/exclude)"  # .git may be a file (a worktree)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-wheels/' "$exclude" 2>/dev/null || echo /.gpu-wheels/ >> "$exclude"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version 3.12 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-wheels \
    "diffusers==$(version diffusers)" "pydantic==$(version pydantic)" \
    "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)"
ls .gpu-wheels
