"""Evaluation: tokenizer-independent benchmarks of one or several models, configured by small task files.

``tasks`` reads task configs and data, ``metrics`` computes scores, ``scoring`` runs a model (log-likelihoods,
sliding windows, generation), ``runner`` ties them together, ``report`` writes JSON, Markdown and a chart.
"""

from yak.evaluation.runner import DEFAULT_TASKS, EvalArguments, evaluate

__all__ = ["DEFAULT_TASKS", "EvalArguments", "evaluate"]
