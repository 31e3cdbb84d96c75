# hypersd image. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 --build-arg EXTRAS=gateway,worker,gpu .
FROM python:3.11-slim AS base

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=gateway,worker,onnx

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY hypersd ./hypersd
COPY jobs ./jobs
COPY launcher ./launcher
COPY training ./training
COPY service ./service
COPY worker ./worker
RUN pip install ".[${EXTRAS}]"
COPY models ./models

RUN useradd --create-home --uid 1000 hypersd
USER hypersd
ENV HYPERSD_REGISTRY=/app/models/registry.toml
ENTRYPOINT ["hypersd"]
# `hypersd serve` (gateway), `hypersd worker --model NAME` (worker) or `hypersd generate ...`
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
EXPOSE 8000 9101
