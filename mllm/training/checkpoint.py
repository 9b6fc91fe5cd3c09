"""Old home of the run-dir format, kept importable: everything now lives in `mllm.run_dir` (and
`mllm.io.atomic_dir`). New code imports from there; these names re-export it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm.io import atomic_dir
from mllm.run_dir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FULL_WEIGHTS,
    RUN_RECORD,
    TRAINED_WEIGHTS,
    NotAnOutputDirError,
    RunRecord,
    load_weights_into,
    read_record,
    save_run_dir,
)

__all__ = [
    "RUN_RECORD",
    "TRAINED_WEIGHTS",
    "FULL_WEIGHTS",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "NotAnOutputDirError",
    "atomic_dir",
    "make_run_record",
    "read_run_record",
    "save_output_dir",
    "load_weights_into",
]


def make_run_record(**kwargs: Any) -> dict[str, Any]:
    """`RunRecord.new(**kwargs)` as its JSON dict."""
    return RunRecord.new(**kwargs).to_json()


def read_run_record(path: str | os.PathLike) -> dict[str, Any]:
    """`mllm.run_dir.read_record(path)` as its JSON dict."""
    return read_record(path).to_json()


def save_output_dir(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    processor: Any,
    run_record: RunRecord | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """`mllm.run_dir.save_run_dir`."""
    return save_run_dir(model, output_dir, processor=processor, record=run_record, state_dict=state_dict)
