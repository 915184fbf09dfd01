"""Training: losses, optimizers, the pure train step, checkpoints, multi-host set-up and the training loop.

May import: models, data, config, experiment, sharding, evaluation (through its evaluator registry), inference.
"""
