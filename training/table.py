"""``hypersd-train table --config training/configs/table-shapes.yaml``: the paper's table.

Every row is a registry model (or one model per step count, e.g. TSCD's N-step LoRAs) measured
at its step counts over the same fixed captions: prompt adherence (the attribute network),
FID (Shapes features) and the mean aesthetic reward. Writes ``table.md`` (steps as columns),
``table.json`` and ``grid.png`` (one row of samples per model and step count, the same captions
and seeds in every row), and checks the paper's claims on the result.

Beside those, every cell is judged by the geometric judge (``training.geometric_judge``: no
network, nothing shared with training) on its own images of the final caption set
(``final_caption_set``, default ``hypersd.shapes.FINAL_CAPTION_SET`` = 3), which no training
or selection step reads: adherence and per-attribute failures, and the claims again under it.
The attribute network, the FID features and the aesthetic reward are all siblings of training
rewards; the geometric judge is the table's measure that a model cannot have been tuned to.

Each cell is cached in ``out/cells/`` once measured, so an interrupted run resumes and a new
row costs only its own cells. A cached cell whose geometric measure is missing or was made by
another judge version (``JUDGE_VERSION``) or on other captions gets that measure added alone:
the cell's other numbers are kept as they were.

The YAML:

    registry: models/registry.toml   # where the models are
    captions: 500
    out: runs/table
    final: Hyper-SD                   # the row the claims are about
    baselines: [LCM, TSCD]            # the rows it must beat at every step count
    teacher: Teacher                  # the row whose 25-step adherence is the reference
    rows:
      - {label: Teacher, model: shapes-base, steps: [1, 2, 4, 8, 25], guidance: 2.0}
      - {label: TSCD, model: {1: shapes-hyper-tscd-1step, 2: shapes-hyper-2step}, steps: [1, 2]}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from hypersd.registry import load_registry
from hypersd.shapes import FINAL_CAPTION_SET, fixed_captions
from training.aesthetic import DEFAULT_MODEL_DIR as AESTHETIC_DIR
from training.aesthetic import load_aesthetic_model
from training.attributes import DEFAULT_MODEL_DIR as ATTRIBUTES_DIR
from training.attributes import load_attribute_net
from training.config import validate_config
from training.devices import resolve_device
from training.evaluate import evaluate_images
from training.geometric_judge import JUDGE_VERSION, JUDGED_ATTRIBUTES, judge_images, summarize
from training.image_ops import images_to_tensor
from training.image_sources import generate_with_registry

GRID_CAPTIONS = 8


@dataclass(frozen=True)
class Row:
    """One model of the table.

    Args:
        label: the row's name in the table.
        models: the registry model for each step count.
        guidance: CFG scale (None: the model's default).
        eta: TCD eta (None: the model's default).
    """

    label: str
    models: dict[int, str]
    guidance: float | None = None
    eta: float | None = None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Row:
        allowed = {"label", "model", "steps", "guidance", "eta"}
        unknown = set(data) - allowed
        if unknown or "label" not in data or "model" not in data:
            raise ValueError(
                f"a row needs label and model (allowed keys: {', '.join(sorted(allowed))}); "
                f"got {sorted(data)}"
            )
        model = data["model"]
        if isinstance(model, dict):
            models = {int(k): str(v) for k, v in model.items()}
            steps = [int(s) for s in data.get("steps", sorted(models))]
            missing = [s for s in steps if s not in models]
            if missing:
                raise ValueError(f"row {data['label']!r}: no model for steps {missing}")
            models = {s: models[s] for s in steps}
        else:
            if "steps" not in data:
                raise ValueError(f"row {data['label']!r}: steps is required with one model")
            models = {int(s): str(model) for s in data["steps"]}
        guidance, eta = data.get("guidance"), data.get("eta")
        return cls(
            label=str(data["label"]),
            models=models,
            guidance=None if guidance is None else float(guidance),
            eta=None if eta is None else float(eta),
        )


@dataclass(frozen=True)
class TableConfig:
    """The table's YAML (see this module's docstring): its rows and how they are measured."""

    rows: tuple[Row, ...]
    registry: str | None = None
    captions: int = 500
    seed: int = 0
    out: str = "runs/table"
    final: str | None = None
    baselines: tuple[str, ...] = ()
    teacher: str | None = None
    threads: int = 1
    device: str = "auto"
    batch_size: int = 50
    final_caption_set: int = FINAL_CAPTION_SET  # the geometric judge's captions (held out)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TableConfig:
        data = yaml.safe_load(Path(path).read_text()) | (overrides or {})
        rows = tuple(Row.parse(row) for row in data.pop("rows", []))
        if not rows:
            raise ValueError(f"{path}: no rows")
        return validate_config(cls, {**data, "rows": rows})


def cell_key(row: Row, steps: int) -> str:
    guidance = "default" if row.guidance is None else f"{row.guidance:g}"
    eta = "default" if row.eta is None else f"{row.eta:g}"
    return f"{row.models[steps]}-{steps}step-g{guidance}-eta{eta}"


# Registry fields that change how a model is served, never its eager images.
_SERVING_ONLY = {"backend", "static_shapes", "strict", "precision", "batch_sizes"}


def model_fingerprint(cfg: TableConfig, model: str) -> str:
    """What a cached cell was measured on: the registry entry and the size and time of each of
    its weight files, so a retrained LoRA under the same name is measured again."""
    spec = load_registry(cfg.registry).get(model)
    files = [spec.path, spec.unet, *(lora.path for lora in spec.loras)]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f and f.is_file()]
    # Cells are generated eager (`generate_with_registry`): how the model is served is no part
    # of what was measured, so changing its backend does not re-measure the table.
    entry = spec.model_dump(mode="json", exclude=_SERVING_ONLY)
    return hashlib.sha1(json.dumps([entry, stats], sort_keys=True).encode()).hexdigest()[:16]


def _generate(cfg: TableConfig, row: Row, steps: int, captions: list[str]) -> list[Image.Image]:
    """One image per caption from the row's model at ``steps``, seeds ``cfg.seed + index``."""
    images, _ = generate_with_registry(
        row.models[steps],
        captions,
        seed=cfg.seed,
        steps=steps,
        guidance=row.guidance,
        eta=row.eta,
        size=None,
        batch_size=cfg.batch_size,
        device=None if cfg.device == "auto" else cfg.device,
        registry_path=cfg.registry,
    )
    return images


def geometric_captions(cfg: TableConfig) -> list[str]:
    """The captions of the geometric judge's measure: the held-out final set."""
    return fixed_captions(cfg.captions, seed=cfg.final_caption_set)


def _geometric_identity(cfg: TableConfig) -> dict[str, Any]:
    """What a cell's geometric measure depends on besides the model (the cell's fingerprint)."""
    return {
        "version": JUDGE_VERSION,
        "caption_set": cfg.final_caption_set,
        "captions": cfg.captions,
        "seed": cfg.seed,
    }


def measure_geometric(cfg: TableConfig, row: Row, steps: int) -> dict[str, Any]:
    """Generate the cell's images of the held-out captions and judge them geometrically."""
    captions = geometric_captions(cfg)
    verdicts = judge_images(_generate(cfg, row, steps, captions), captions)
    return summarize(verdicts, captions) | _geometric_identity(cfg)


def measure_cell(cfg: TableConfig, row: Row, steps: int, captions: list[str]) -> dict[str, Any]:
    """Generate and judge one (model, steps) cell; cached as JSON + its grid samples."""
    cells = Path(cfg.out) / "cells"
    key = cell_key(row, steps)
    path = cells / f"{key}.json"
    fingerprint = model_fingerprint(cfg, row.models[steps])
    if path.exists():
        cached: dict[str, Any] = json.loads(path.read_text())
        same = (cached["captions"], cached["seed"], cached.get("fingerprint"))
        if same == (len(captions), cfg.seed, fingerprint):
            geometric = cached.get("geometric", {})
            if {k: geometric.get(k) for k in _geometric_identity(cfg)} != _geometric_identity(cfg):
                # A cell measured before the judge existed (or by another version of it):
                # add the judge's measure, keep every other number as measured.
                cached["geometric"] = measure_geometric(cfg, row, steps)
                path.write_text(json.dumps(cached, indent=2) + "\n")
            return cached
    device = None if cfg.device == "auto" else cfg.device
    started = time.time()
    images = _generate(cfg, row, steps, captions)
    seconds = time.time() - started
    judge = load_attribute_net(ATTRIBUTES_DIR, resolve_device(device))
    report = evaluate_images(images, captions, judge, seed=cfg.seed)
    aesthetic = load_aesthetic_model(AESTHETIC_DIR, resolve_device(device))
    with torch.no_grad():
        rewards = torch.cat(
            [
                aesthetic.reward(images_to_tensor(images[i : i + 100], aesthetic.device)).cpu()
                for i in range(0, len(images), 100)
            ]
        )
    cells.mkdir(parents=True, exist_ok=True)
    strip = np.concatenate([np.asarray(im.convert("RGB")) for im in images[:GRID_CAPTIONS]], 1)
    Image.fromarray(strip).save(cells / f"{key}.png")
    result = {
        "model": row.models[steps],
        "steps": steps,
        "guidance": row.guidance,
        "eta": row.eta,
        "captions": len(captions),
        "seed": cfg.seed,
        "adherence": report.adherence,
        "fid": report.fid,
        "reward": float(rewards.mean()),
        "generation_seconds": round(seconds, 1),
        "fingerprint": fingerprint,
        "geometric": measure_geometric(cfg, row, steps),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def network_adherence(cell: dict[str, Any]) -> float:
    """The cell's prompt adherence by the attribute network (the table's captions)."""
    return float(cell["adherence"]["all"])


def geometric_adherence(cell: dict[str, Any]) -> float:
    """The cell's prompt adherence by the geometric judge (the held-out captions)."""
    return float(cell["geometric"]["adherence"]["all"])


# The teacher-ratio claims: steps -> the share of the teacher's 25-step adherence to reach.
# The attribute network's table states the paper's 1-step claim; the geometric judge's
# also issue 14's 2-step target.
NETWORK_RATIOS = {1: 0.9}
GEOMETRIC_RATIOS = {1: 0.9, 2: 0.95}


def claims(
    cfg: TableConfig,
    results: dict[str, dict[int, dict[str, Any]]],
    adherence: Callable[[dict[str, Any]], float] = network_adherence,
    ratios: dict[int, float] | None = None,
    judged: str = "",
) -> list[str]:
    """The paper's claims checked on the measured cells, one line each.

    ``adherence`` reads a cell's adherence (the network's by default); ``judged`` is added
    to each line (e.g. `` (geometric judge)``) to tell the judges' lines apart.
    """
    lines: list[str] = []
    if cfg.final is None or cfg.final not in results:
        return lines
    final = results[cfg.final]
    for baseline in cfg.baselines:
        for steps, cell in sorted(final.items()):
            other = results.get(baseline, {}).get(steps)
            if other is None:
                continue
            ours, theirs = adherence(cell), adherence(other)
            verdict = "yes" if ours > theirs else "NO"
            lines.append(
                f"- {cfg.final} beats {baseline} at {steps} step(s){judged}: {verdict} "
                f"({ours:.1%} vs {theirs:.1%})"
            )
    teacher = results.get(cfg.teacher or "", {}).get(25)
    for steps, target in sorted((NETWORK_RATIOS if ratios is None else ratios).items()):
        if teacher is None or steps not in final:
            continue
        ratio = adherence(final[steps]) / max(adherence(teacher), 1e-9)
        verdict = "yes" if ratio >= target else "NO"
        lines.append(
            f"- {cfg.final} at {steps} step{'s' if steps > 1 else ''}{judged} reaches "
            f">= {target:.0%} of the teacher's 25-step adherence: {verdict} ({ratio:.1%} of it)"
        )
    return lines


def _failures(cell: dict[str, Any]) -> str:
    """The geometric judge's failures of a cell, most frequent first: ``shape 97, size 4``."""
    counts = cell["geometric"]["failures"]["all"]
    ranked = sorted((a for a in JUDGED_ATTRIBUTES if counts[a]), key=lambda a: -counts[a])
    return ", ".join(f"{a} {counts[a]}" for a in ranked) or "none"


def markdown(cfg: TableConfig, results: dict[str, dict[int, dict[str, Any]]]) -> str:
    columns = sorted({s for cells in results.values() for s in cells})
    header = "| model | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    measures: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
        ("Prompt adherence (higher is better)", lambda c: f"{c['adherence']['all']:.1%}"),
        ("FID, Shapes features (lower is better)", lambda c: f"{c['fid']['all']:.1f}"),
        ("Mean aesthetic reward (clean renders ~1.04)", lambda c: f"{c['reward']:.3f}"),
        (
            f"Prompt adherence, geometric judge, held-out caption set {cfg.final_caption_set}"
            " (higher is better)",
            lambda c: f"{geometric_adherence(c):.1%}",
        ),
        (
            f"Geometric judge: images failing each attribute (of {cfg.captions})",
            _failures,
        ),
    )
    lines = [
        f"{cfg.captions} fixed captions, seed {cfg.seed}; images from the serving pipeline (the "
        "registry's recipes), judged by models/shapes-attributes.",
        "",
        f"The geometric judge's tables: {cfg.captions} other captions (caption set "
        f"{cfg.final_caption_set}, read by no training or selection step), judged with no "
        "network (training/geometric_judge.py: components, palette distances, the renderer's "
        "templates); it shares nothing with training.",
        "",
    ]
    for title, fmt in measures:
        lines += [f"**{title}**", "", header, rule]
        for label, cells in results.items():
            values = [fmt(cells[s]) if s in cells else "–" for s in columns]
            lines.append(f"| {label} | " + " | ".join(values) + " |")
        lines.append("")
    checked = claims(cfg, results) + claims(
        cfg, results, geometric_adherence, GEOMETRIC_RATIOS, " (geometric judge)"
    )
    if checked:
        lines += ["**The paper's claims on this table**", "", *checked, ""]
    return "\n".join(lines)


def grid(cfg: TableConfig, results: dict[str, dict[int, dict[str, Any]]]) -> Image.Image:
    """One strip of samples per (row, steps), top to bottom in table order."""
    strips = []
    rows = {row.label: row for row in cfg.rows}
    for label, cells in results.items():
        for steps in sorted(cells):
            key = cell_key(rows[label], steps)
            strips.append(np.asarray(Image.open(Path(cfg.out) / "cells" / f"{key}.png")))
    return Image.fromarray(np.concatenate(strips, 0))


def run(cfg: TableConfig) -> dict[str, dict[int, dict[str, Any]]]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    captions = fixed_captions(cfg.captions)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for row in cfg.rows:
        results[row.label] = {}
        for steps in row.models:
            cell = measure_cell(cfg, row, steps, captions)
            results[row.label][steps] = cell
            print(
                f"{row.label} @ {steps}: adherence {network_adherence(cell):.1%}, "
                f"geometric judge {geometric_adherence(cell):.1%}",
                flush=True,
            )
    out = Path(cfg.out)
    (out / "table.md").write_text(markdown(cfg, results))
    (out / "table.json").write_text(json.dumps(results, indent=2) + "\n")
    grid(cfg, results).save(out / "grid.png")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypersd-train table", description=__doc__)
    parser.add_argument("--config", required=True, help="the table's YAML")
    parser.add_argument("--captions", type=int, help="override the caption count")
    parser.add_argument("--out", help="override the output folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides: dict[str, Any] = {}
    if args.captions:
        overrides["captions"] = args.captions
    if args.out:
        overrides["out"] = args.out
    cfg = TableConfig.load(args.config, overrides)
    results = run(cfg)
    print((Path(cfg.out) / "table.md").read_text())
    return 0 if results else 1
