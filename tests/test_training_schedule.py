"""The one learning-rate schedule of every training loop."""

from __future__ import annotations

import itertools

import pytest

from training.schedule import lr_factor


def test_cosine_warms_up_then_decays_to_its_floor() -> None:
    rates = [lr_factor(step, warmup_steps=10, total_steps=100, floor=0.1) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_constant_warms_up_then_holds() -> None:
    rates = [lr_factor(s, warmup_steps=4, total_steps=10, schedule="constant") for s in range(10)]
    assert rates == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # No warm-up: the full rate from the first update.
    assert lr_factor(0, warmup_steps=0, total_steps=10, schedule="constant") == 1.0


def test_an_unknown_schedule_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        lr_factor(0, warmup_steps=0, total_steps=1, schedule="linear")  # type: ignore[arg-type]
