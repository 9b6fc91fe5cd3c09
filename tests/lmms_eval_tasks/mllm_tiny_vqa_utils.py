"""Document functions of the mllm_tiny_vqa lmms-eval task (see mllm_tiny_vqa.yaml)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from mllm.evaluation import exact_match, vqa_accuracy


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The row's image (a path relative to the working directory, where the data file lies)."""
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any]) -> str:
    """The question exactly as the data asks it (what `mllm eval --task vqa` asks)."""
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The scores `mllm eval --task vqa` gives the answer."""
    prediction = results[0]
    return {
        "vqa_accuracy": vqa_accuracy(prediction, doc["answers"]),
        "exact_match": exact_match(prediction, doc["answers"]),
    }
