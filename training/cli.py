"""``hypersd-train <stage> [--config FILE] [key=value ...]``: one entry point for every stage."""

from __future__ import annotations

import importlib
import sys

# stage name -> "module:function", a ``(argv: list[str]) -> int`` entry point
STAGES = {
    "base": "training.base:main",
    "attributes": "training.attributes:main",
    "aesthetic": "training.aesthetic:main",
    "segmentation": "training.segmentation:main",
    "evaluate": "training.evaluate:main",
    "convert-imagereward": "training.imagereward:main",
    "convert-inception": "training.inception:main",
    "eval-summary": "training.eval_summary:main",
    "encode": "training.encode:main",
    "tscd": "training.distill:main",
    "lcm": "training.distill:main_lcm",
    "feedback": "training.enhance:main",
    "dmd": "training.enhance:main_dmd",
    "table": "training.table:main",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: hypersd-train <stage> [--config FILE] [key=value ...]")
        print("stages: " + ", ".join(STAGES))
        return 0 if args else 2
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module, function = STAGES[stage].split(":")
    return int(getattr(importlib.import_module(module), function)(rest))


if __name__ == "__main__":
    raise SystemExit(main())
