"""Evaluation: mergeable segmentation statistics (confusion matrix, mIoU, accuracy and fusion weights by object
size) and the evaluators a run lists in `config.eval.evaluators`.

May import: models, data, config, experiment, sharding, inference, visualize. Never training.
"""
