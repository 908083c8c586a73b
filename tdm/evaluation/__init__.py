"""Metrics: one module per metric (digits, hps, aesthetic, clip_score, fid, vbench) and a runner (runner.py)."""

# The names `evaluate.metrics` accepts (kept here so config validation does not import torch).
METRICS = ("digits_fid", "class_accuracy", "hps", "aesthetic", "clip", "fid")
DIGITS_METRICS = ("digits_fid", "class_accuracy")
IMAGE_METRICS = ("hps", "aesthetic", "clip", "fid")
