"""`mllm.hub.export(run, output, to=...)`: a run dir -> a folder that plain transformers loads.

``llava`` — native `LlavaForConditionalGeneration` (mlp depth 2, linear); ``remote-code`` — the
model's own code written into the folder (Q-Former, deeper MLPs), loaded with
``trust_remote_code=True``; ``mllm`` — the merged run dir itself (loads where mllm is installed).
LoRA / QLoRA runs are merged first (QLoRA onto the unquantised LLM). Weights are safetensors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from mllm.io import PARTIAL

__all__ = [
    "DTYPES",
    "EXPORT_FORMATS",
    "ExportFormat",
    "default_format",
    "export",
    "folder_listing",
    "load_for_export",
    "main",
]

ExportFormat = Literal["llava", "remote-code", "mllm"]
EXPORT_FORMATS: tuple[str, ...] = ("llava", "remote-code", "mllm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_format(run: str | os.PathLike) -> ExportFormat:
    """``llava`` when Llava can express the run's architecture, else ``remote-code`` (reads config.json only)."""
    from mllm.hub.llava import llava_unsupported_reason
    from mllm.models.configuration_mllm import MllmConfig

    config = MllmConfig.from_pretrained(str(run))
    return "llava" if llava_unsupported_reason(config) is None else "remote-code"


def folder_listing(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file under ``folder``, sorted."""
    folder = Path(folder)
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    )


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
    repo_id: str | None = None,
    license: str = "other",
    datasets: list[str] | None = None,
) -> Path:
    """Write run dir ``run`` to the new folder ``output`` in format ``to``, with its model card
    (``README.md``); returns ``output``.

    The folder is built beside ``output`` and moved into place when complete. ``dtype`` (default:
    the run's, float32 for a QLoRA run's 4-bit LLM) casts the weights, e.g. ``torch.bfloat16``.
    The card's usage loads ``repo_id`` (default: the folder itself); ``license`` and ``datasets``
    (Hub ids; default: the stages' Hub ``data_path``) go into its metadata.
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
    if to == "llava":  # refuse before loading any weights
        from mllm.hub.llava import llava_unsupported_reason
        from mllm.models.configuration_mllm import MllmConfig

        reason = llava_unsupported_reason(MllmConfig.from_pretrained(str(run)))
        if reason is not None:
            raise ValueError(
                f"`{run}` cannot be exported as Llava: {reason}; export it with `--to remote-code` instead."
            )
    model, processor = load_for_export(run, dtype=dtype)
    staging = output.parent / f".{output.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write(model, processor, staging, to, run)
        from mllm.hub.card import model_card

        card = model_card(
            run,
            to=to,
            model_id=repo_id or str(output.resolve()),
            processor=processor,
            model_config=model.config,
            license=license,
            datasets=datasets,
        )
        card.save(staging / "README.md")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm export",
        description="Write an `mllm train` run dir as a folder plain transformers loads, with its model card: "
        "`llava` (native LlavaForConditionalGeneration: mlp depth 2 or linear connectors), `remote-code` "
        "(the model's code in the folder, for Q-Former and deeper MLPs; trust_remote_code=True) or `mllm` "
        "(mllm's own layout, all weights). LoRA / QLoRA adapters are merged first.",
    )
    parser.add_argument("run", help="run dir written by `mllm train` (final output or checkpoint-N)")
    parser.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="export format")
    parser.add_argument("--output", required=True, help="new folder to write the export to")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: as saved)"
    )
    parser.add_argument("--repo", default=None, help="Hub id the card's usage loads (default: the folder)")
    parser.add_argument("--license", default="other", help="license in the card metadata (default: other)")
    parser.add_argument(
        "--dataset", action="append", default=None, help="Hub dataset id for the card (repeatable)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = export(
        args.run,
        args.output,
        to=args.to,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
        repo_id=args.repo,
        license=args.license,
        datasets=args.dataset,
    )
    print(f"mllm export: {args.run} -> {out} ({args.to})")
    for name, size in folder_listing(out):
        print(f"  {name}  {size:,} bytes")
    return 0
