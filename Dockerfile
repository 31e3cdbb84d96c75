# hypersd images, one file, three targets:
#   docker build --target gateway -t hypersd-gateway .        the API only: no torch (~200 MB)
#   docker build --target worker-cpu -t hypersd-worker-cpu .  a CPU worker with the Shapes models
#   docker build --target worker-cuda -t hypersd-worker-cuda . an NVIDIA GPU worker (torch + CUDA
#                                                               wheels, ONNX Runtime GPU, TensorRT)
# The worker images run `hypersd worker --model NAME`; the gateway runs `hypersd serve`.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HYPERSD_REGISTRY=/app/models/registry.toml \
    HYPERSD_ENGINE_CACHE=/var/cache/hypersd/engines
# The workers' engine cache is a volume (compose, Kubernetes); the folder exists in the image and
# belongs to the worker user, so that a fresh named volume mounted on it does too.
RUN useradd --create-home --uid 1000 hypersd \
    && mkdir -p /var/cache/hypersd/engines \
    && chown hypersd:hypersd /var/cache/hypersd/engines
WORKDIR /app
# The packages, without models or tests (see .dockerignore); each target installs its extra.
# `pip install .[extra]` installs this project, whose pyproject.toml bounds every dependency
# (torch pinned); DL3013 (pin versions) is ignored for those lines alone.
COPY pyproject.toml README.md ./
COPY hypersd ./hypersd
COPY jobs ./jobs
COPY service ./service
COPY worker ./worker
COPY launcher ./launcher
COPY training ./training

# The gateway: FastAPI + Celery client + Redis, no torch. It needs the registry (names, steps,
# sizes), never the weights.
FROM base AS gateway
# hadolint ignore=DL3013
RUN pip install ".[gateway]"
COPY models/registry.toml ./models/registry.toml
USER 1000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["hypersd"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# A CPU worker: torch's CPU build (pinned), ONNX Runtime, and the shipped Shapes models.
FROM base AS worker-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==2.13.0" \
    && pip install ".[worker,onnx]"
COPY models ./models
USER 1000
# The heartbeat file is the liveness signal (a busy single-slot worker fails `celery inspect
# ping`); the worker writes it from the moment its model is loaded and warm.
ENV HYPERSD_HEARTBEAT_FILE=/tmp/hypersd-heartbeat
EXPOSE 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD ["python", "-c", "import os, sys, time; sys.exit(time.time() - os.path.getmtime('/tmp/hypersd-heartbeat') > 30)"]
ENTRYPOINT ["hypersd"]
CMD ["worker"]

# A GPU worker: PyPI's torch is the CUDA build (its CUDA libraries come as wheels; the driver
# comes from the host through the NVIDIA container toolkit). Real SD1.5/SDXL weights are mounted
# at run time (a volume or the Hugging Face cache), never downloaded.
FROM base AS worker-cuda
# hadolint ignore=DL3013
RUN pip install "torch==2.13.0" \
    && pip install ".[worker,gpu]"
COPY models/registry.toml ./models/registry.toml
USER 1000
ENV HYPERSD_HEARTBEAT_FILE=/tmp/hypersd-heartbeat
EXPOSE 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s \
    CMD ["python", "-c", "import os, sys, time; sys.exit(time.time() - os.path.getmtime('/tmp/hypersd-heartbeat') > 30)"]
ENTRYPOINT ["hypersd"]
CMD ["worker"]
