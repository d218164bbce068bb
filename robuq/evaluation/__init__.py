"""Evaluation: sampling (sampling.py), feature networks (features.py), FID/KID/IS/precision/recall
(metrics.py) and the `evaluate` job (evaluate.py). See docs/EVALUATION.md."""
