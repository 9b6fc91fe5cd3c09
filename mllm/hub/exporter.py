"""`mllm.hub.export(run, output, to=...)`: a run dir -> a folder that plain transformers loads.

``llava`` — native `LlavaForConditionalGeneration` (mlp depth 2, linear); ``remote-code`` — the
model's own code written into the folder (Q-Former, deeper MLPs), loaded with
``trust_remote_code=True``; ``mllm`` — the merged run dir itself (loads where mllm is installed).
LoRA / QLoRA runs are merged first (QLoRA onto the unquantised LLM). Weights are safetensors only.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from mllm.io import PARTIAL

__all__ = ["EXPORT_FORMATS", "ExportFormat", "export", "load_for_export"]

ExportFormat = Literal["llava", "remote-code", "mllm"]
EXPORT_FORMATS: tuple[str, ...] = ("llava", "remote-code", "mllm")


def load_for_export(run: str | os.PathLike, dtype: torch.dtype | None = None):
    """The run's model with every LoRA merged and nothing quantised, and its processor."""
    from peft import PeftModel

    from mllm.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(run, dtype=dtype, merge_lora=True, quantize=False)
    if isinstance(model, PeftModel):  # pragma: no cover - merge_lora=True never returns one
        model = model.merge_and_unload()
    return model, processor


def export(
    run: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: ExportFormat = "llava",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write run dir ``run`` to the new folder ``output`` in format ``to``; returns ``output``.

    The folder is built beside ``output`` and moved into place when complete. ``dtype`` (default:
    the run's, float32 for a QLoRA run's 4-bit LLM) casts the weights, e.g. ``torch.bfloat16``.
    """
    from mllm.run_dir import read_record

    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format `{to}`; choose one of {list(EXPORT_FORMATS)}.")
    read_record(run)  # a clear error first when `run` is not a run dir
    output = Path(output)
    if output.resolve() == Path(run).resolve():
        raise ValueError(f"--output must differ from the run dir `{run}`.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"`{output}` exists and is not empty; choose a new folder (or overwrite=True).")
    model, processor = load_for_export(run, dtype=dtype)
    staging = output.parent / f".{output.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write(model, processor, staging, to, run)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _write(model, processor, folder: Path, to: str, run: str | os.PathLike) -> None:
    if to == "llava":
        from mllm.hub.llava import export_llava

        export_llava(model, processor, folder)
    elif to == "remote-code":
        from mllm.hub.remote_code import export_remote_code

        export_remote_code(model, processor, folder)
    else:
        from mllm.run_dir import read_record, save_run_dir

        # Every weight in the folder (format ``full``): a Hub repo cannot point at the run's components.
        record = read_record(run)
        record = dataclasses.replace(
            record.merged(run) if record.lora_components else record,
            modified=record.modified_after_merge | {"language_model"},
        )
        save_run_dir(model, folder, processor=processor, record=record)
