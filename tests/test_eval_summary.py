"""``hypersd-train eval-summary``: one table row per evaluation folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import eval_summary, evaluate


def test_summary_has_one_row_per_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b"):
        args = ["--reference", "renders", "--captions", "20", "--quiet", "--out"]
        assert evaluate.main([*args, str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert eval_summary.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| source | steps | guidance | captions | adherence")
    rows = lines[2:]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == "renders" and cells[3] == "20"
        assert cells[4] == "**100.0%**"  # renders are what the measure calls correct
