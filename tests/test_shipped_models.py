"""Every model of the shipped registry loads from its files and generates at its default steps.

The distilled Shapes models are the base model plus LoRAs in ``models/shapes-hyper/`` (fp16,
fused in the order the registry lists them); a missing or mismatched file fails here, not in
a worker at start-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hypersd.pipeline import ImageRequest, load
from hypersd.registry import load_registry

REGISTRY = load_registry(Path(__file__).resolve().parents[1] / "models" / "registry.toml")
PROMPT = "a large red circle in the center on a white background"


@pytest.mark.parametrize("name", REGISTRY.names)
def test_shipped_model_generates(name: str) -> None:
    torch.set_num_threads(1)
    spec = REGISTRY.get(name)
    assert all(lora.path.exists() for lora in spec.loras), "a LoRA file is missing"
    generator = load(spec, device="cpu", warmup=False)
    result = generator.generate([ImageRequest(PROMPT, seed=0)])
    image = np.asarray(result.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 5  # a picture, not a flat field
