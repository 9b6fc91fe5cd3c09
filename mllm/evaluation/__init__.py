"""Evaluation: metrics (VQA accuracy, pycocoevalcap caption metrics, multiple choice, yes/no) and the
`mllm eval` runner with its tasks (vqa, caption, mcq, yesno; one file each in ``tasks/``)."""

from __future__ import annotations

from mllm.evaluation.caption_eval import caption_metrics, caption_scores
from mllm.evaluation.choice import match_choice, parse_inline_options
from mllm.evaluation.metrics import (
    METRICS,
    TASK_METRICS,
    exact_match,
    normalize_answer,
    vqa_accuracy,
    vqa_accuracy_normalized,
)
from mllm.evaluation.runner import TASKS, evaluate, evaluate_model
from mllm.evaluation.yesno_metrics import parse_yes_no, yes_no_metrics

__all__ = [
    "METRICS",
    "TASKS",
    "TASK_METRICS",
    "caption_metrics",
    "caption_scores",
    "evaluate",
    "evaluate_model",
    "exact_match",
    "match_choice",
    "normalize_answer",
    "parse_inline_options",
    "parse_yes_no",
    "vqa_accuracy",
    "vqa_accuracy_normalized",
    "yes_no_metrics",
]
