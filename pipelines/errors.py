"""Errors shared by weights loading (models.py) and fine-tuning checkpoints (checkpoints.py), kept
apart so that the two import each other only one way (models -> checkpoints)."""
from __future__ import annotations


class WeightsError(RuntimeError):
    """Pretrained weights are missing, unreadable, or do not fit the backbone."""
