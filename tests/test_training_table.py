"""``hypersd-train table``: cells measured through the registry, cached, tabled and checked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from hypersd.registry import load_registry
from training import table
from training.table import Row, TableConfig, model_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def test_rows_parse_and_refuse_bad_ones() -> None:
    one = Row.parse({"label": "T", "model": "m", "steps": [1, 25], "guidance": 2})
    assert one.models == {1: "m", 25: "m"} and one.guidance == 2.0
    per_step = Row.parse({"label": "S", "model": {1: "a", 2: "b"}})
    assert per_step.models == {1: "a", 2: "b"} and per_step.guidance is None
    with pytest.raises(ValueError, match="no model for steps"):
        Row.parse({"label": "S", "model": {1: "a"}, "steps": [1, 4]})
    with pytest.raises(ValueError, match="steps is required"):
        Row.parse({"label": "S", "model": "a"})
    with pytest.raises(ValueError, match="allowed keys"):
        Row.parse({"label": "S", "model": "a", "steps": [1], "colour": "red"})


def test_table_on_the_shipped_model(tmp_path: Path) -> None:
    config = {
        "registry": str(ROOT / "models" / "registry.toml"),
        "captions": 4,
        "out": str(tmp_path / "table"),
        "final": "Fast",
        "baselines": ["Slow"],
        "teacher": "Teacher",
        "threads": 1,
        "device": "cpu",
        "rows": [
            {"label": "Teacher", "model": "shapes-base", "steps": [1, 25], "guidance": 2.0},
            {"label": "Slow", "model": "shapes-base", "steps": [1], "guidance": 5.0},
            {"label": "Fast", "model": {1: "shapes-base"}, "guidance": 2.0},
        ],
    }
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(config))
    assert table.main(["--config", str(path)]) == 0
    out = tmp_path / "table"
    text = (out / "table.md").read_text()
    for label in ("| Teacher |", "| Slow |", "| Fast |", "Prompt adherence", "FID", "reward"):
        assert label in text
    # "Fast" is the teacher's own 1-step cell: the claim lines are computed, not asserted
    assert "- Fast beats Slow at 1 step(s):" in text
    assert "- Fast at 1 step reaches >= 90% of the teacher's 25-step adherence: NO" in text
    grid = Image.open(out / "grid.png")
    assert grid.size == (4 * 64, 4 * 64)  # 4 captions wide, one strip per cell of the table
    # cells are cached: a second run measures nothing again
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 3  # Fast @ 1 and Teacher @ 1 share a cell (same model, steps, guidance)
    stamps = [c.stat().st_mtime_ns for c in cells]
    results = table.run(TableConfig.load(path))
    assert [c.stat().st_mtime_ns for c in cells] == stamps
    assert results["Fast"][1] == results["Teacher"][1]
    # the geometric judge's own tables and claims, on the held-out captions (set 3)
    assert "Prompt adherence, geometric judge, held-out caption set 3" in text
    assert "Geometric judge: images failing each attribute (of 4)" in text
    assert "- Fast beats Slow at 1 step(s) (geometric judge):" in text
    assert "- Fast at 2 steps (geometric judge)" not in text  # no 2-step cell to check
    geometric = results["Teacher"][25]["geometric"]
    assert geometric["caption_set"] == 3 and geometric["captions"] == 4
    assert set(geometric["adherence"]) == {"all", "one", "two"}


def test_cached_cells_gain_the_geometric_judge_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell cached before the judge existed (or by another version of it) gets the judge's
    measure added; its other numbers are kept, not measured again."""
    out = tmp_path / "table"
    cfg = TableConfig(
        rows=(Row.parse({"label": "T", "model": "shapes-base", "steps": [1], "guidance": 2}),),
        registry=str(ROOT / "models" / "registry.toml"),
        captions=2,
        out=str(out),
        device="cpu",
    )
    first = table.run(cfg)["T"][1]
    (cell,) = (out / "cells").glob("*.json")
    old = json.loads(cell.read_text())
    del old["geometric"]
    old["adherence"] = {"all": 0.123}  # a marker: the network's numbers must survive as they are
    cell.write_text(json.dumps(old))
    again = table.run(cfg)["T"][1]
    assert again["adherence"] == {"all": 0.123}
    assert again["geometric"] == first["geometric"]
    assert json.loads(cell.read_text())["geometric"] == first["geometric"]
    # another judge version: measured again, still without touching the rest
    monkeypatch.setattr(table, "JUDGE_VERSION", 99)
    bumped = table.run(cfg)["T"][1]
    assert bumped["geometric"]["version"] == 99 and bumped["adherence"] == {"all": 0.123}


def test_fingerprint_follows_the_weight_files(tiny_models: Any, tmp_path: Path) -> None:
    """A retrained LoRA under the same name is measured again, not read from the cache."""
    registry = tmp_path / "registry.toml"
    shutil.copy(tiny_models.registry, registry)
    for path in tiny_models.root.iterdir():
        if path.name != "registry.toml":
            (tmp_path / path.name).symlink_to(path)
    lora_entry = next(
        name for name in load_registry(registry).names if load_registry(registry).get(name).loras
    )
    lora_file = load_registry(registry).get(lora_entry).loras[0].path
    cfg = TableConfig(rows=(), registry=str(registry))
    before = model_fingerprint(cfg, lora_entry)
    assert before == model_fingerprint(cfg, lora_entry)
    target = lora_file.resolve()
    lora_file.unlink()
    shutil.copy(target, lora_file)
    os.utime(lora_file, ns=(1, 1))
    assert model_fingerprint(cfg, lora_entry) != before


def test_shipped_table_config_names_registry_models() -> None:
    """`make table`'s config: every row's model is a shipped registry entry that allows the row's
    step counts, and the claims name rows of the table."""
    cfg = TableConfig.load(ROOT / "training" / "configs" / "table-shapes.yaml")
    registry = load_registry(ROOT / cfg.registry) if cfg.registry else load_registry()
    labels = {row.label for row in cfg.rows}
    assert cfg.final in labels and cfg.teacher in labels and set(cfg.baselines) <= labels
    for row in cfg.rows:
        for steps, model in row.models.items():
            assert steps in registry.get(model).steps, (row.label, steps, model)
