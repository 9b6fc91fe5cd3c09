"""`mllm merge RUN --output DIR [--dtype ...]`: fold a run's LoRA into full weights, as a run dir."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from mllm.models.loading import load_model_and_processor
from mllm.run_dir import read_record, save_run_dir

__all__ = ["main", "merge"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(path: str | os.PathLike, output: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Load ``path`` (a run dir with a LoRA adapter), merge the adapter, save the result to ``output``.

    The result's record is `RunRecord.merged`: a LoRA on the LLM makes it format ``full``
    (``model.safetensors``), a LoRA on the vision tower only stays ``trained``. A QLoRA run's base
    LLM is loaded in ``dtype`` (default: the checkpoint's), never in 4 bit, then merged.
    """
    record = read_record(path)
    if not record.lora_components:
        raise ValueError(
            f"`{path}` was not tuned with LoRA (tuning {dict(record.tuning)}): nothing to merge."
        )
    if Path(output).resolve() == Path(path).resolve():
        raise ValueError(f"--output must differ from the run dir `{path}`.")
    model, processor = load_model_and_processor(path, dtype=dtype, merge_lora=True, quantize=False)
    return save_run_dir(model, output, processor=processor, record=record.merged(path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm merge",
        description="Fold the LoRA adapter of an `mllm train` run dir into the weights and save a run dir "
        "that plain `from_pretrained` loads.",
    )
    parser.add_argument("run", help="run dir written by `mllm train` (final output or checkpoint-N)")
    parser.add_argument("--output", required=True, help="folder to write the merged run dir to")
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="weights dtype (default: as saved, float32)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = merge(args.run, args.output, dtype=_DTYPES[args.dtype] if args.dtype else None)
    print(f"mllm merge: {args.run} -> {out}")
    return 0
