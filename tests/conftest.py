"""Shared pytest fixtures.

This module must stay importable without torch: the gateway's tests run where torch is not
installed, so fixtures import torch, diffusers and `tiny_models` inside their bodies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tiny_models import TinyModels


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
