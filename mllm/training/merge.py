"""`merge(path, output)`: fold LoRA into full weights and save a full-weight output dir."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mllm.models.loading import load_model_and_processor
from mllm.training.checkpoint import read_run_record, save_output_dir

__all__ = ["merge"]


def merge(path: str | os.PathLike, output: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Load ``path`` (an output dir with a LoRA adapter), merge the adapter, save format (a) to ``output``.

    A QLoRA run's base LLM is loaded in ``dtype`` (default: the checkpoint's), never in 4 bit, then merged.
    """
    record = read_run_record(path)
    model, processor = load_model_and_processor(path, dtype=dtype, merge_lora=True, quantize=False)
    modified = set(record["modified"])
    if record["tuning"]["tune_llm"] in ("lora", "qlora"):
        modified.add("language_model")
    if record["tuning"]["tune_vision"] == "lora":
        modified.add("vision_tower")
    merged = {**record, "modified": sorted(modified), "merged_from": str(path)}
    merged["format"] = "full" if "language_model" in modified else "trained"
    return save_output_dir(model, output, processor=processor, run_record=merged)
