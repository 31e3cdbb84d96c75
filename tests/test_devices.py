"""Device names for training and evaluation."""

from __future__ import annotations

import pytest
import torch

from training.devices import resolve_device


def test_named_devices_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "mps0", ""])
def test_unknown_device_names_list_the_allowed_ones(name: str) -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N"):
        resolve_device(name)
