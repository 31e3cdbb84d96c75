"""Shared pytest fixtures.

This module must stay importable without torch: the gateway's tests run where torch is not
installed, so fixtures import torch, diffusers and `tiny_models` inside their bodies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tiny_models import TinyModels

# `hypersd.backends.cache.CACHE_ENV`, spelled out: this module must not import hypersd (torch).
ENGINE_CACHE_ENV = "HYPERSD_ENGINE_CACHE"


@pytest.fixture(scope="session", autouse=True)
def engine_cache(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """One artefact cache for the whole run, kept between runs in pytest's cache folder.

    The shipped Shapes models are served by ONNX Runtime, whose artefact is exported on a
    model's first load (2-3 s each): shared here by the tests and the workers they start
    (`serving_env` passes it on), it is built once per model, not once per process. Reusing it
    across runs is safe because its keys hash everything an artefact depends on; the tests of
    the build itself (`test_backends.py`) use fresh folders.
    """
    store = request.config.cache  # None under `-p no:cacheprovider`: then this run's own folder
    folder = store.mkdir("hypersd-engines") if store else tmp_path_factory.mktemp("engines")
    previous = os.environ.get(ENGINE_CACHE_ENV)
    os.environ[ENGINE_CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(ENGINE_CACHE_ENV, None)
    else:
        os.environ[ENGINE_CACHE_ENV] = previous


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tiny random SD1.5/SDXL pipelines, LoRAs, a 1-step UNet and a registry naming them all.

    Built once per session (about two seconds); see `tests/tiny_models.py`.
    """
    torch = pytest.importorskip("torch")
    from tiny_models import build_tiny_models

    # The test machines share two cores with other work.
    torch.set_num_threads(2)
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


# Redis, Celery worker and uvicorn fixtures of the serving tests (tests/serving_fixtures.py).
pytest_plugins = ["serving_fixtures"]
