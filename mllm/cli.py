"""The `mllm` command: `mllm train RECIPE.yaml [key=value ...]`, `mllm eval`, `mllm merge`, ...

Each subcommand hands its arguments to the module that does the work; nothing heavy (torch,
transformers) is imported until a subcommand runs, so `mllm --help` is instant.

A user's mistake (a bad recipe or override, bad data, a component or file that cannot be read)
prints one line naming what to fix; the traceback only with ``--debug`` (before or after the
subcommand) or ``MLLM_DEBUG=1``. Exit status: 0 done, 1 a problem with data, files or components,
2 a usage or configuration error, 130 interrupted. An unexpected error (a bug) keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

__all__ = ["EXIT_CONFIG", "EXIT_ERROR", "SUBCOMMANDS", "main"]

EXIT_ERROR = 1  # bad data, a file or component that cannot be read, a failed check
EXIT_CONFIG = 2  # bad command line, recipe or override
EXIT_INTERRUPTED = 130

# subcommand -> (module with `main(argv) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "mllm.training.cli",
        "train a stage from a recipe YAML: mllm train RECIPE.yaml [key=value ...]",
    ),
    "eval": (
        "mllm.evaluation.runner",
        "evaluate a model: mllm eval MODEL --task vqa|caption|mcq|yesno|retrieval --data FILE [--cot --beams N]",
    ),
    "merge": (
        "mllm.training.merge",
        "fold a LoRA adapter into full weights: mllm merge RUN_DIR --output DIR",
    ),
    "cache-features": (
        "mllm.training.cache_features",
        "encode a recipe's images once with its frozen tower: mllm cache-features RECIPE.yaml [key=value ...]",
    ),
    "chat": (
        "mllm.inference.chat",
        "chat with a model in the terminal: mllm chat MODEL [--image PATH] [--cot] [--beams N]",
    ),
    "export": (
        "mllm.hub.exporter",
        "export a run for plain transformers: mllm export RUN --to llava|remote-code|mllm --output DIR",
    ),
    "push": (
        "mllm.hub.upload",
        "export a run with its model card to the Hub: mllm push RUN --repo USER/NAME [--dry-run]",
    ),
}

_PACKAGE_DIR = Path(__file__).resolve().parent
# library code whose ValueError / OSError means "this input cannot be loaded", not a bug of ours
_LOADER_FILES = (
    "transformers/configuration_utils.py",
    "transformers/utils/hub.py",
    "transformers/models/auto/",
    "transformers/tokenization_utils_base.py",
    "transformers/modeling_utils.py",
    "huggingface_hub/",
    "safetensors/",
    "peft/config.py",
)


def _usage() -> str:
    lines = ["usage: mllm [--debug] <command> [args...]", "", "commands:"]
    width = max(len(name) for name in SUBCOMMANDS) + 2
    lines += [f"  {name:{width}s}{help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help  show this message; `mllm <command> --help` for a command's own options",
        "  --debug     print the Python traceback of an error (also: MLLM_DEBUG=1)",
        "",
        "exit status: 0 done, 1 bad data / files / components, 2 usage or configuration error, 130 or 143 when",
        "Ctrl-C or SIGTERM stopped training (it says how to resume).",
    ]
    return "\n".join(lines)


def configure_logging() -> None:
    """mllm's INFO messages (trainable parameters, skipped records) on the console, rank 0 only;
    the other ranks print warnings and errors."""
    rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger("mllm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    # peft imports bitsandbytes whenever it is installed; its CPU backend warns on every start that
    # an optional kernel package is missing, which matters to no mllm command
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _is_user_error(err: BaseException) -> int | None:
    """The exit status for an error that is the user's to fix, or None for a bug (traceback)."""
    from mllm.config import ConfigError

    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if not isinstance(err, (ValueError, OSError)):
        return None
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return EXIT_ERROR
    frames = traceback.extract_tb(err.__traceback__)
    where = Path(frames[-1].filename).resolve() if frames else None
    if where is None:
        return None
    if _PACKAGE_DIR in where.parents or str(where).startswith(str(_PACKAGE_DIR.parent / "data_tools")):
        return EXIT_ERROR  # mllm raises ValueError / OSError with a message for the user
    text = where.as_posix()
    if any(part in text for part in _LOADER_FILES):
        return EXIT_ERROR
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MLLM_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"mllm: unknown command `{command}`; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return EXIT_CONFIG
    if "--debug" in rest:
        debug, rest = True, [a for a in rest if a != "--debug"]
    configure_logging()
    try:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mllm {command}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        status = _is_user_error(err)
        if status is None or debug:
            raise
        print(f"mllm {command}: error: {_one_line(err)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    raise SystemExit(main())
