"""Check a dataset the way training would read it, without training.

    python -m data_tools.validate DATA [--image-folder DIR]
        (--processor DIR | --llm PATH --vision PATH [--connector mlp])
        [--template NAME] [--model-max-length N] [--truncation drop|cut_text] [--report FILE.json]

Reports every record that ``bad_data=skip`` would skip and ``bad_data=strict`` would stop on
(record id, file#index, reason, detail): schema and turn-order problems, placeholder/image count
mismatches, records with nothing to supervise, samples longer than ``--model-max-length``, and
every image that does not load (each one is opened and decoded). Also prints the distribution of
token lengths (image tokens counted) and a one-line summary.

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
from typing import TextIO

import numpy as np
from tqdm.auto import tqdm

from mllm.data.dataset import SupervisedDataset
from mllm.data.errors import BadRecordError
from mllm.data.formats import Record, _normalize, check_record_structure, read_raw_records, save_json
from mllm.data.images import load_image
from mllm.models.processing_mllm import MllmProcessor

__all__ = ["ValidationReport", "load_processor", "main", "validate"]


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
    processor: MllmProcessor,
    image_folder: str | os.PathLike[str] | None = None,
    template: str | None = None,
    model_max_length: int | None = None,
    truncation: str = "drop",
    num_workers: int = 4,
    progress: bool = True,
) -> ValidationReport:
    """Run every check of the data layer on ``data_path``; images are loaded with ``num_workers`` threads.

    Raises ``ValueError`` when the file itself cannot be read.
    """
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
    processor: str | None, llm: str | None, vision: str | None, connector: str = "mlp"
) -> MllmProcessor:
    """A saved processor folder, or the processor of ``vision`` + ``llm`` with the image-token count
    that ``MllmConfig`` derives for ``connector`` (no model weights are loaded)."""
    if processor is not None:
        return MllmProcessor.from_pretrained(processor)
    if llm is None or vision is None:
        raise ValueError("give --processor DIR, or both --llm and --vision.")
    from transformers import AutoConfig

    from mllm.models.configuration_mllm import MllmConfig
    from mllm.models.vision import vision_config_from

    config = MllmConfig(
        vision_config=vision_config_from(vision),
        text_config=AutoConfig.from_pretrained(llm),
        connector_type=connector,
    )
    return MllmProcessor.from_components(vision, llm, num_image_tokens=config.num_image_tokens)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", help="LLaVA json/jsonl, messages json/jsonl, parquet or a datasets folder")
    parser.add_argument("--image-folder", default=None, help="root of relative image paths")
    parser.add_argument("--processor", default=None, help="a saved MllmProcessor folder")
    parser.add_argument("--llm", default=None, help="LLM id or folder (its tokenizer is used)")
    parser.add_argument(
        "--vision", default=None, help="vision tower id or folder (its image processor is used)"
    )
    parser.add_argument("--connector", default="mlp", help="connector type (sets the image-token count)")
    parser.add_argument("--template", default=None, help="chat template name (default: the tokenizer's own)")
    parser.add_argument("--model-max-length", type=int, default=None, help="report samples longer than this")
    parser.add_argument("--truncation", default="drop", choices=["drop", "cut_text"])
    parser.add_argument("--workers", type=int, default=4, help="threads that load images")
    parser.add_argument("--report", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        processor = load_processor(args.processor, args.llm, args.vision, args.connector)
        report = validate(
            args.data,
            processor,
            image_folder=args.image_folder,
            template=args.template,
            model_max_length=args.model_max_length,
            truncation=args.truncation,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report, args.data)
    if args.report:
        save_json(report.to_json(), args.report)
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
