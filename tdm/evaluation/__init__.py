"""Metrics: one module per metric (digits, hps, aesthetic, clip_score, fid, vbench), a runner (runner.py), the
evaluation row (rows.py) and its table (table.py)."""

# The names `evaluate.metrics` accepts (kept here so config validation does not import torch).
METRICS = ("digits_fid", "class_accuracy", "digits_view2", "hps", "aesthetic", "clip", "fid")
DIGITS_METRICS = ("digits_fid", "class_accuracy", "digits_view2")
IMAGE_METRICS = ("hps", "aesthetic", "clip", "fid")
# VBench dimensions usable in custom_input mode, as metrics `vbench_<dimension>` (video sample sets).
VBENCH_DIMENSIONS = ("temporal_flickering", "subject_consistency", "background_consistency", "aesthetic_quality",
                     "imaging_quality", "motion_smoothness", "dynamic_degree", "human_action", "temporal_style",
                     "overall_consistency")

# Video families' default: the VBench quality dimensions that run on custom prompts (the paper's VBench total
# also needs the standard prompt suite's semantic dimensions, which custom_input mode cannot score).
VIDEO_METRICS = tuple(f"vbench_{d}" for d in ("subject_consistency", "background_consistency", "temporal_flickering",
                                              "motion_smoothness", "dynamic_degree", "aesthetic_quality",
                                              "imaging_quality"))
VIDEO_FAMILIES = ("cogvideox", "wan")


def is_metric(name: str) -> bool:
    return name in METRICS or (name.startswith("vbench_") and name[len("vbench_"):] in VBENCH_DIMENSIONS)
