"""Check a dataset the way training would read it, without training.

    python -m data_tools.validate DATA [--image-folder DIR]                       # formats, images
    python -m data_tools.validate DATA --recipe RECIPE.yaml                       # + token lengths
    python -m data_tools.validate DATA --model RUN_DIR                            # + token lengths
    python -m data_tools.validate DATA --model-name-or-path LLM --vision-tower TOWER
        [--connector-type mlp] [--num-query-tokens N] [--vision-feature-select-strategy full]
    [--template NAME|auto] [--model-max-length N] [--truncation drop|cut_text] [--report FILE.json]

With no model: every record that ``bad_data=skip`` would skip and ``bad_data=strict`` would stop
on (record id, file#index, reason, detail): schema and turn-order problems, placeholder/image
count mismatches, and every image that does not load (each one is opened and decoded).
With a model (a recipe, an output dir of `mllm train`, or the components): also records with
nothing to supervise, samples longer than ``--model-max-length`` and the distribution of token
lengths, with each image counted as the model's real number of image tokens (from its config).
Flags are the recipe keys in kebab case; a recipe's keys fill in what the flags leave out.

Exit status: 0 when no problem was found, 1 when problems were found (the report lists them),
2 when the data file or the components cannot be read at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mllm.data.errors import BadRecordError
from mllm.data.formats import Record, _normalize, check_record_structure, read_raw_records, save_json
from mllm.data.images import load_image

if TYPE_CHECKING:
    from mllm.models.processing_mllm import MllmProcessor

__all__ = ["ValidationReport", "load_processor", "main", "processor_from_recipe", "validate"]

# recipe keys that decide the processor (and its image-token count); the flag is the key in kebab case
ARCHITECTURE_KEYS = (
    "vision_tower",
    "model_name_or_path",
    "connector_type",
    "connector_depth",
    "num_query_tokens",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_token",
)


@dataclass
class ValidationReport:
    """What ``validate`` found."""

    num_records: int  # records in the data file
    problems: list[BadRecordError] = field(default_factory=list)  # one per problem, in data order
    lengths: list[int] = field(default_factory=list)  # token counts (image tokens counted) before truncation
    model_max_length: int | None = None
    num_dropped_too_long: int = 0  # samples model_max_length would drop

    @property
    def counts(self) -> Counter[str]:
        """reason -> number of problems."""
        return Counter(p.reason for p in self.problems)

    def length_stats(self) -> dict[str, float]:
        """min / median / p95 / max of ``lengths`` (empty dict without lengths)."""
        if not self.lengths:
            return {}
        import numpy as np

        arr = np.asarray(self.lengths)
        return {
            "min": int(arr.min()),
            "median": float(np.median(arr)),
            "p95": float(np.percentile(arr, 95)),
            "max": int(arr.max()),
        }

    def to_json(self) -> dict:
        return {
            "num_records": self.num_records,
            "num_problems": len(self.problems),
            "by_reason": dict(sorted(self.counts.items())),
            "problems": [
                {"id": p.record_id, "source": p.source, "reason": p.reason, "detail": p.detail}
                for p in self.problems
            ],
            "lengths": self.length_stats(),
            "model_max_length": self.model_max_length,
            "dropped_too_long": self.num_dropped_too_long,
        }


def _order(source: str) -> tuple[str, int]:
    name, _, index = source.rpartition("#")
    return (name, int(index)) if index.isdigit() else (source, 0)


def validate(
    data_path: str | os.PathLike[str],
    processor: MllmProcessor | None,
    image_folder: str | os.PathLike[str] | None = None,
    template: str | None = None,
    model_max_length: int | None = None,
    truncation: str = "drop",
    num_workers: int = 4,
    progress: bool = True,
) -> ValidationReport:
    """Run every check of the data layer on ``data_path``; images are loaded with ``num_workers`` threads.

    Without a ``processor`` only formats, placeholders and images are checked (no token lengths).
    Raises ``ValueError`` when the file itself cannot be read.
    """
    from tqdm.auto import tqdm

    path = Path(data_path)
    raws = read_raw_records(path)
    report = ValidationReport(num_records=len(raws), model_max_length=model_max_length)
    # Same path resolution as formats.load_records.
    root = os.path.abspath(image_folder) if image_folder is not None else None
    base_dir = str((path if path.is_dir() else path.parent).absolute())
    records: list[Record] = []
    for raw, source in tqdm(raws, desc="records", disable=not progress):
        try:
            record = _normalize(raw, source, root=root, base_dir=base_dir)
            check_record_structure(record)
        except BadRecordError as err:
            report.problems.append(err)
            continue
        records.append(record)

    if processor is not None:
        from mllm.data.dataset import SupervisedDataset

        dataset = SupervisedDataset(records, processor, template, model_max_length, "skip", truncation)
        report.problems.extend(dataset.errors)
        report.lengths = list(dataset.untruncated_lengths)
        report.num_dropped_too_long = dataset.skipped["too_long"]

    jobs = [(record, ref) for record in records for ref in record.images]

    def check(job: tuple[Record, object]) -> BadRecordError | None:
        record, ref = job
        try:
            load_image(ref, record_id=record.id, source=record.source)  # type: ignore[arg-type]
        except BadRecordError as err:
            return err
        return None

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = pool.map(check, jobs)
        for err in tqdm(results, total=len(jobs), desc="images", disable=not progress):
            if err is not None:
                report.problems.append(err)
    report.problems.sort(key=lambda p: _order(p.source))
    return report


def load_processor(
    processor: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
    connector: str = "mlp",
    **architecture: Any,
) -> MllmProcessor:
    """The processor of a saved output dir (``processor``), or of ``vision`` + ``llm`` with the
    image-token count of the `MllmConfig` these settings make (``architecture``: the other
    `ARCHITECTURE_KEYS`, e.g. ``num_query_tokens``, ``vision_feature_select_strategy``).

    Either way the count comes from the model config, never from defaults; no weights are loaded.
    """
    from mllm.models.processing_mllm import MllmProcessor

    if processor is not None:
        return _saved_processor(processor)
    if llm is None or vision is None:
        raise ValueError("give --model DIR, --recipe FILE, or both --model-name-or-path and --vision-tower.")
    from transformers import AutoConfig

    from mllm.models.configuration_mllm import MllmConfig
    from mllm.models.vision import vision_config_from

    image_token = architecture.pop("image_token", "<image>")
    config = MllmConfig(
        vision_config=vision_config_from(vision),
        text_config=AutoConfig.from_pretrained(llm),
        connector_type=connector,
        image_token=image_token,
        **architecture,
    )
    return MllmProcessor.from_components(
        vision, llm, num_image_tokens=config.num_image_tokens, image_token=image_token
    )


def _saved_processor(path: str) -> MllmProcessor:
    """A saved output dir's processor, its image-token count checked against the saved model config."""
    from mllm.models.processing_mllm import MllmProcessor

    processor = MllmProcessor.from_pretrained(path)
    if (Path(path) / "config.json").is_file():
        from mllm.models.configuration_mllm import MllmConfig

        processor.num_image_tokens = MllmConfig.from_pretrained(path).num_image_tokens
    return processor


def processor_from_recipe(recipe: dict[str, Any], overrides: dict[str, Any] | None = None) -> MllmProcessor:
    """The processor a recipe trains with: its ``init_from`` output dir, else its components and
    architecture keys (``overrides``, the flags given, win over the recipe)."""
    keys = {k: v for k, v in recipe.items() if k in ARCHITECTURE_KEYS}
    keys.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if recipe.get("init_from") and not (overrides or {}).get("model_name_or_path"):
        return _saved_processor(str(recipe["init_from"]))
    return load_processor(
        None,
        keys.pop("model_name_or_path", None),
        keys.pop("vision_tower", None),
        keys.pop("connector_type", "mlp"),
        **keys,
    )


def print_report(report: ValidationReport, data_path: str, out: TextIO | None = None) -> None:
    """Problems one per line, counts by reason, length distribution, then the one-line summary."""
    out = out if out is not None else sys.stdout
    for p in report.problems:
        print(f"{p.reason:22s} {p.record_id!s:>12s}  {p.source}  {p.detail}", file=out)
    if report.problems:
        print("problems by reason:", file=out)
        for reason, n in sorted(report.counts.items()):
            print(f"  {reason:22s} {n}", file=out)
    stats = report.length_stats()
    if stats:
        print(
            "tokens per sample (image tokens counted): " + ", ".join(f"{k} {v:g}" for k, v in stats.items()),
            file=out,
        )
    if report.model_max_length is not None:
        print(
            f"model_max_length={report.model_max_length} drops {report.num_dropped_too_long} sample(s)",
            file=out,
        )
    by_reason = ", ".join(f"{r}={n}" for r, n in sorted(report.counts.items())) or "none"
    status = "OK" if not report.problems else "PROBLEMS"
    print(
        f"{status}: {data_path}: {report.num_records} records, {len(report.problems)} problem(s) ({by_reason})",
        file=out,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        help="LLaVA json/jsonl, messages json/jsonl, parquet or a datasets "
        "folder (default: the recipe's data_path)",
    )
    parser.add_argument("--image-folder", default=None, help="root of relative image paths")
    parser.add_argument("--recipe", default=None, help="a training recipe: its model, template and data keys")
    parser.add_argument(
        "--model",
        "--processor",
        dest="model",
        default=None,
        help="an output dir of mllm train (or a saved processor)",
    )
    parser.add_argument(
        "--model-name-or-path",
        "--llm",
        dest="model_name_or_path",
        default=None,
        help="the LLM (its tokenizer)",
    )
    parser.add_argument(
        "--vision-tower",
        "--vision",
        dest="vision_tower",
        default=None,
        help="the vision tower (its image processor)",
    )
    parser.add_argument(
        "--connector-type", "--connector", dest="connector_type", default=None, help="linear | mlp | qformer"
    )
    parser.add_argument(
        "--connector-depth", type=int, default=None, help="Linear layers of the mlp connector"
    )
    parser.add_argument("--num-query-tokens", type=int, default=None, help="Q-Former queries (qformer only)")
    parser.add_argument("--vision-feature-layer", type=int, default=None, help="vision hidden state used")
    parser.add_argument(
        "--vision-feature-select-strategy", choices=["default", "full"], default=None, help="full keeps CLS"
    )
    parser.add_argument("--image-token", default=None, help="the image placeholder (default <image>)")
    parser.add_argument(
        "--template", default=None, help="chat template name; auto = the tokenizer's own (the default)"
    )
    parser.add_argument("--model-max-length", type=int, default=None, help="report samples longer than this")
    parser.add_argument("--truncation", default=None, choices=["drop", "cut_text"])
    parser.add_argument("--workers", type=int, default=4, help="threads that load images")
    parser.add_argument("--report", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm.cli import configure_logging

    configure_logging()
    try:
        recipe: dict[str, Any] = {}
        if args.recipe is not None:
            from mllm.config import load_recipe

            recipe = load_recipe(args.recipe)
        data = args.data or recipe.get("data_path")
        if not data:
            raise ValueError("give the data file (or a --recipe with data_path).")
        flags = {key: getattr(args, key) for key in ARCHITECTURE_KEYS}
        if args.model is not None:
            processor = load_processor(args.model)
            template = args.template or _recorded_template(args.model)
        elif args.recipe is not None or flags["model_name_or_path"] or flags["vision_tower"]:
            processor = processor_from_recipe(recipe, flags)
            template = args.template or recipe.get("template")
        else:
            processor, template = None, None
        template = None if template == "auto" else template
        image_folder = args.image_folder or recipe.get("image_folder")
        max_length = args.model_max_length or (recipe.get("model_max_length") if processor else None)
        report = validate(
            data,
            processor,
            image_folder=image_folder,
            template=template,
            model_max_length=max_length,
            truncation=args.truncation or recipe.get("truncation", "drop"),
            num_workers=args.workers,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print_report(report, data)
    if processor is None:
        print("(no model given: token lengths not checked; add --recipe or --model)")
    if args.report:
        save_json(report.to_json(), args.report)
    return 1 if report.problems else 0


def _recorded_template(run_dir: str) -> str | None:
    """The ``template`` an output dir of mllm train was trained with (its mllm_run.json), if any."""
    import json

    try:
        record = json.loads((Path(run_dir) / "mllm_run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = record.get("config") or record.get("recipe") or {}
    return config.get("template") if isinstance(config, dict) else None


if __name__ == "__main__":
    raise SystemExit(main())
