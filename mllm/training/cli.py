"""`mllm train RECIPE.yaml [key=value ...]` (also under `accelerate launch ... -m mllm train ...`)."""

from __future__ import annotations

import argparse
import sys

from mllm.config import ConfigError, build_run_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mllm train",
        description="Train one stage from a recipe YAML; key=value pairs override the recipe.",
    )
    parser.add_argument("recipe", help="recipe YAML (a flat mapping of argument names)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=2e-5")
    args = parser.parse_args(argv)
    try:
        run = build_run_config(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"mllm train: {err}", file=sys.stderr)
        return 2
    from mllm.training.stages import train

    result = train(run)
    print(
        f"mllm train: {result.global_step} steps, loss {result.train_loss:.4f}, "
        f"{result.runtime_s:.0f}s -> {result.output_dir}"
    )
    return 0
