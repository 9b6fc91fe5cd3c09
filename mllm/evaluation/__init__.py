"""Evaluation: metrics (VQA accuracy, exact match, ...) and the `mllm eval` runner."""

from __future__ import annotations

from mllm.evaluation.metrics import (
    METRICS,
    TASK_METRICS,
    exact_match,
    normalize_answer,
    vqa_accuracy,
    vqa_accuracy_normalized,
)
from mllm.evaluation.runner import TASKS, evaluate, evaluate_model

__all__ = [
    "METRICS",
    "TASKS",
    "TASK_METRICS",
    "evaluate",
    "evaluate_model",
    "exact_match",
    "normalize_answer",
    "vqa_accuracy",
    "vqa_accuracy_normalized",
]
