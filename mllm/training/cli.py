"""`mllm train RECIPE.yaml [key=value ...]` (also under `accelerate launch ... -m mllm train ...`).

recipe + overrides -> typed config -> preflight (data, output dir, checkpoints; before any model
loads) -> `stages.train` -> one summary line on rank 0. Errors are reported by `mllm.cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "summary"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm train",
        description="Train one stage from a recipe YAML; key=value pairs override the recipe.",
        epilog="Values are read as YAML, typed by the field: save_strategy=no is the string 'no', "
        "bf16=no is false; resume_from_checkpoint=true resumes from the last checkpoint in output_dir.",
    )
    parser.add_argument("recipe", help="recipe YAML (a flat mapping of argument names)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=2e-5")
    return parser


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (``RANK`` as torchrun / accelerate set it), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm.config import build_run_config
    from mllm.training.preflight import preflight

    run = build_run_config(args.recipe, args.overrides)
    preflight(run)
    from mllm.training.stages import train

    result = train(run)
    if is_main_process():
        print(summary(result))
    return result.exit_code  # 130 / 143 when a signal stopped the run (it says how to resume)


def summary(result: Any) -> str:
    """One line: steps, time, loss, samples/s, skipped records by reason, the output dir."""
    samples_per_s = getattr(result, "samples_per_second", None)
    if samples_per_s is None:
        samples_per_s = _logged(Path(result.output_dir), "train_samples_per_second")
    skipped = dict(getattr(result, "skipped", {}) or {})
    skipped_text = (
        f"{sum(skipped.values())} skipped ({', '.join(f'{r}={n}' for r, n in sorted(skipped.items()))})"
        if skipped
        else "0 skipped"
    )
    rate = f", {samples_per_s:.1f} samples/s" if samples_per_s is not None else ""
    rate += "".join(
        f", {v:.0f} {u}/s"
        for u, v in (
            ("tokens", getattr(result, "tokens_per_second", None)),
            ("image tokens", getattr(result, "image_tokens_per_second", None)),
        )
        if v is not None
    ) + (f", MFU {result.mfu:.1%}" if getattr(result, "mfu", None) is not None else "")
    return (
        f"mllm train: done: {result.global_step} steps in {result.runtime_s:.0f}s, "
        f"loss {result.train_loss:.4f}{rate}, {skipped_text} -> {result.output_dir}"
    )


def _logged(output_dir: Path, key: str) -> float | None:
    """The last ``key`` in the Trainer's log history (``trainer_state.json`` of the output dir)."""
    try:
        state = json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for entry in reversed(state.get("log_history", [])):
        if key in entry:
            return float(entry[key])
    return None
