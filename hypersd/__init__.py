"""hypersd: fast 1-8 step text-to-image serving and the Hyper-SD distillation pipeline."""

__version__ = "0.1.0"
