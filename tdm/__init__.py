"""tdm: Trajectory Distribution Matching distillation."""
__version__ = "0.1.0"
