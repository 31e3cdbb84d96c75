"""``hypersd-train <stage> [--config FILE] [key=value ...]``: one entry point for every stage."""

from __future__ import annotations

import importlib
import sys

# stage name -> module with a ``main(argv: list[str]) -> int`` function
STAGES = {
    "base": "training.base",
    "attributes": "training.attributes",
    "aesthetic": "training.aesthetic",
    "segmentation": "training.segmentation",
    "evaluate": "training.evaluate",
    "eval-summary": "training.eval_summary",
    "tscd": "training.distill",
    "lcm": "training.lcm_baseline",
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
    module = importlib.import_module(STAGES[stage])
    return int(module.main(rest))


if __name__ == "__main__":
    raise SystemExit(main())
