"""Training: the Shapes base model, reward models, Hyper-SD distillation, evaluation."""
