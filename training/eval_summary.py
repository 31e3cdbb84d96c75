"""``hypersd-train eval-summary DIR [DIR ...]``: one markdown table from several evaluations.

Each DIR is an ``--out`` folder of ``hypersd-train evaluate`` (its ``eval.json``);
the table has one row per evaluation: what was sampled, how, and what it scored, by the
attribute network and by the geometric judge (``training.geometric_judge``; "–" for reports
written before it), with the caption set each was measured on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summary_row(report: dict[str, Any]) -> str:
    meta = report.get("meta", {})
    adherence, fid = report["adherence"], report["fid"]
    geometric = report.get("geometric") or {}
    cells = [
        str(meta.get("source", "?")),
        str(meta.get("steps") or "default"),
        "–" if meta.get("guidance") is None else f"{meta['guidance']:g}",
        str(report["count"]),
        f"**{adherence['all']:.1%}**",
        f"{adherence.get('one', float('nan')):.1%}",
        f"{adherence.get('two', float('nan')):.1%}",
        f"{fid['all']:.1f}",
        f"{geometric['adherence']['all']:.1%}" if geometric else "–",
        str(meta.get("caption_set", "?")),
    ]
    return "| " + " | ".join(cells) + " |"


def summary_table(reports: list[dict[str, Any]]) -> str:
    lines = [
        "| source | steps | guidance | captions | adherence | one object | two objects | FID "
        "| geometric judge | caption set |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(lines + [summary_row(r) for r in reports])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hypersd-train eval-summary", description=__doc__)
    parser.add_argument("folders", nargs="+", help="output folders of `hypersd-train evaluate`")
    args = parser.parse_args(argv)
    reports = [json.loads((Path(f) / "eval.json").read_text()) for f in args.folders]
    print(summary_table(reports))
    return 0
