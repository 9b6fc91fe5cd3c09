"""Yes/no answers and POPE's figures (Li et al. 2023, "Evaluating Object Hallucination in Large
Vision-Language Models", https://github.com/RUCAIBox/POPE); rules in ``mllm.evaluation.tasks.yesno``."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["parse_yes_no", "yes_no_metrics"]

_WORD = re.compile(r"[a-z]+")


def parse_yes_no(text: str) -> str | None:
    """``"yes"``, ``"no"`` or None (neither), by the rule in the module doc."""
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    has_yes, has_no = "yes" in words, "no" in words or "not" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def yes_no_metrics(parsed: Sequence[str | None], labels: Sequence[str]) -> dict[str, float | int]:
    """POPE's figures from parsed answers (None = neither) and labels (rules in the module doc)."""
    if len(parsed) != len(labels):
        raise ValueError(f"{len(parsed)} answers but {len(labels)} labels.")
    n = len(labels)
    tp = sum(p == "yes" and y == "yes" for p, y in zip(parsed, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(parsed, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(parsed, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(parsed, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "num_neither": sum(p is None for p in parsed),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
