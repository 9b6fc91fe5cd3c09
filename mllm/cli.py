"""The `mllm` command: `mllm train RECIPE.yaml [key=value ...]`, `mllm eval`, `mllm merge`, ...

Each subcommand hands its arguments to the module that does the work; nothing is imported
until a subcommand is chosen, so `mllm --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main", "SUBCOMMANDS"]

# subcommand -> (module with `main(argv) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "mllm.training.cli",
        "train a stage from a recipe YAML: mllm train RECIPE.yaml [key=value ...]",
    ),
    "eval": (
        "mllm.evaluation.runner",
        "evaluate a model: mllm eval MODEL --task vqa --data FILE [--output DIR]",
    ),
    "merge": (
        "mllm.training.merge",
        "fold a LoRA adapter into full weights: mllm merge RUN_DIR --output DIR",
    ),
}


def _usage() -> str:
    lines = ["usage: mllm <command> [args...]", "", "commands:"]
    lines += [f"  {name:11s} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"mllm: unknown command `{command}`; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
