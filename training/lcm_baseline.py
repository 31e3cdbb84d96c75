"""``hypersd-train lcm``: the LCM-LoRA baseline, trained by ``training.distill``'s loop.

Same data, LoRA, budget and bookkeeping as ``hypersd-train tscd``; the objective is
``training.objectives.lcm.lcm_losses`` (k = 1 consistency distillation).
"""

from __future__ import annotations

from training.distill import main_lcm


def main(argv: list[str]) -> int:
    return main_lcm(argv)
