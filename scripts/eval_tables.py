"""The README's evaluation tables, from the main job's output (`python -m scripts.quickstart` first).

    python -m scripts.eval_tables [--workdir runs] [--cot-questions 60]

1. every generation task of `mllm eval` on the held-out test split, on the main job's model
   (``runs/tiny-stage2-lora``): vqa (``vqa_test.jsonl``), caption (``stage1_test.json``), mcq and yesno
   (``mcq_test.jsonl`` / ``pope_test.jsonl`` from `data_tools.eval_sets`);
2. with ``runs/tiny-cot`` (``mllm train recipes/tiny/stage2_cot.yaml``): `mllm eval --cot` on the first
   ``--cot-questions`` questions of ``cot_test.json`` without search and with each search of
   LLaVA-CoT's tables 5 and 6 (stage-level N=2 and N=4, best-of-N, sentence-level).

Each evaluation is the Python call `mllm eval` makes; the command is printed beside its figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TASK_METRICS = {
    "vqa": ("exact_match", "vqa_accuracy", "majority_baseline", "question_type_prior"),
    "caption": ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"),
    "mcq": ("accuracy", "num_unmatched"),
    "yesno": ("accuracy", "precision", "recall", "f1", "yes_ratio", "num_neither"),
}
COT_RUNS = (  # (label, output folder under WORKDIR/eval, flags)
    ("no search (greedy)", "cot-greedy", {}),
    ("stage-level, N=2", "cot-stage-2", {"beams": 2, "search": "stage"}),
    ("stage-level, N=4", "cot-stage-4", {"beams": 4, "search": "stage"}),
    ("best-of-N, N=4", "cot-best_of_n-4", {"beams": 4, "search": "best_of_n"}),
    ("sentence-level, N=2", "cot-sentence-2", {"beams": 2, "search": "sentence"}),
)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs"))
    parser.add_argument("--cot-questions", type=int, default=60)
    parser.add_argument("--skip-tasks", action="store_true", help="only the CoT table")
    args = parser.parse_args(argv)

    from data_tools.eval_sets import write_eval_sets
    from mllm.evaluation.runner import evaluate

    work, data = args.workdir, args.workdir / "data"
    model = work / "tiny-stage2-lora"
    if not args.skip_tasks:
        write_eval_sets(data)
        tasks = {
            "vqa": (data / "vqa_test.jsonl", {"image_position": "after"}),
            "caption": (data / "stage1_test.json", {"max_new_tokens": 48}),
            "mcq": (data / "mcq_test.jsonl", {"image_position": "after"}),
            "yesno": (data / "pope_test.jsonl", {"image_position": "after"}),
        }
        lines = ["| task | command | metrics | time |", "|---|---|---|---|"]
        for task, (path, kw) in tasks.items():
            start = time.perf_counter()
            metrics = evaluate(
                str(model),
                task,
                str(path),
                output=str(work / "eval" / task),
                batch_size=32,
                overwrite=True,
                **kw,
            )
            seconds = time.perf_counter() - start
            flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in kw.items())
            shown = ", ".join(f"{k} {_fmt(metrics[k])}" for k in TASK_METRICS[task] if k in metrics)
            command = f"`mllm eval {model} --task {task} --data {path}{flags}`"
            lines.append(f"| {task} ({metrics['num_samples']}) | {command} | {shown} | {seconds:.0f} s |")
        print("\n".join(lines))
        print()

    cot = work / "tiny-cot"
    if not (cot / "config.json").is_file():
        print(f"{cot} not found: `mllm train recipes/tiny/stage2_cot.yaml` gives the CoT table.")
        return 0
    lines = [
        f"| search ({args.cot_questions} questions of cot_test.json) | flags | exact match | judgements | s/question |",
        "|---|---|---|---|---|",
    ]
    for label, folder, kw in COT_RUNS:
        output = work / "eval" / folder
        start = time.perf_counter()
        metrics = evaluate(
            str(cot),
            "vqa",
            str(data / "cot_test.json"),
            output=str(output),
            limit=args.cot_questions,
            batch_size=16,
            cot=True,
            overwrite=True,
            **kw,
        )
        seconds = (time.perf_counter() - start) / max(1, metrics["num_samples"])
        flags = "--cot" + "".join(f" --{k} {v}" for k, v in kw.items())
        lines.append(
            f"| {label} | `{flags}` | {100 * metrics['exact_match']:.1f}% | {_judgements(output)} | {seconds:.2f} |"
        )
    print("\n".join(lines))
    return 0


def _judgements(output: Path) -> str:
    """Judgements per question and how many fell back to log-probability, from the traces."""
    import json

    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    traces = [r.get("cot_trace") for r in rows if r.get("cot_trace")]
    if not traces:
        return "-"
    judged = sum(t["judgements"] for t in traces) / len(traces)
    fallback = sum(t["judge_fallbacks"] for t in traces) / max(1, sum(t["judgements"] for t in traces))
    return f"{judged:.1f}/q ({100 * fallback:.0f}% fell back to log-prob)"


if __name__ == "__main__":
    sys.exit(main())
