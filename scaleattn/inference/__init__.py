"""Inference: the eval-mode forward pass (whole or tiled, decided once), the memory budget, prediction over files,
export and the serving artefact. Used by evaluation, prediction, the panels, export and the benchmark.

May import: models, crf, data, config, experiment, sharding, visualize. Never training or evaluation.
"""
from scaleattn.inference.forward import predict_labels, predict_scores, to_input_size

__all__ = ["predict_labels", "predict_scores", "to_input_size"]
