"""`mllm eval`: run a trained model on an evaluation file and write predictions and metrics.

    mllm eval MODEL --task vqa|caption|mcq|yesno --data FILE [--image-folder DIR] [--output DIR]
                    [--batch-size N] [--max-new-tokens N] [--template NAME] [--limit N]
                    [--blank-images] [--instruction TEXT] [--image-position before|after] [--strict]
                    [--metrics bleu,meteor,rouge,cider[,spice]] [--circular] [--overwrite] [--json]
                    [--cot [--beams N] [--search stage|best_of_n|sentence]]
    mllm eval MODEL --task retrieval --data FILE [--rerank K] [--image-folder DIR] [--output DIR] ...

Each task is one file in ``mllm/evaluation/tasks/`` (its data shapes, prompt and metrics are in its
docstring) registered in :data:`TASKS`; they all run through one loop (:mod:`mllm.evaluation.loop`).
``--cot`` scores the ``<CONCLUSION>`` of a LLaVA-CoT staged answer; ``--beams N`` finds that answer by
stage-level beam search (:mod:`mllm.inference.stage_beam`; ``--search`` picks the paper's baselines).
``--task retrieval`` ranks images and captions instead of generating (a BLIP-2 stage-1 run dir or a
CLIP / SigLIP dual encoder; :mod:`mllm.evaluation.retrieval_eval`).

``--data`` is read as `mllm train` reads it (``mllm.data.formats.read_raw_records``: json list,
jsonl, parquet, a ``datasets.save_to_disk`` folder, an imagefolder with ``metadata.jsonl``), one
sample per record, as the task's own row shape or as a training record (LLaVA ``conversations`` from
human/gpt, or ``messages`` with role/content, content a string or a list of ``{"type": "image"}`` /
``{"type": "text", "text": ...}`` parts), normalised by ``mllm.data.formats.normalize_record``: the
reference is the LAST assistant turn, the question is the user turn before it with its ``<image>``
placeholders where they stand, and every earlier turn (system, user, assistant) is context in the
prompt. All images of the record go to the model in placeholder order. For vqa, a row is
``question_id`` (or ``id``), ``image`` (optional; a path or a list of paths), ``question`` and
``answers`` (list of strings or of ``{"answer": ...}``; a single ``answer`` string also works),
optionally ``question_type``; the prompt is ``<image>\\n{question}`` (``{question}\\n<image>`` with
``--image-position after``) unless the question already holds its ``<image>`` placeholder.

Relative image paths resolve against ``--image-folder`` (default: the data file's folder). The prompt
is rendered with the chat template the model was trained with and asks exactly what the data asks:
``--instruction TEXT`` appends ``\\n{TEXT}`` to the question only when given. LLaVA-1.5 evaluates
VQAv2, GQA and other short-answer benchmarks with :data:`LLAVA_VQA_INSTRUCTION` ("Answer the question
using a single word or phrase.", ``llava/eval`` question files,
https://github.com/haotian-liu/LLaVA/blob/main/docs/Evaluation.md); pass it for a model trained on
such prompts.

The output folder receives ``predictions.jsonl`` (id, prompt: the text sent to the model, prediction,
references, score: the sample's score, and the task's columns -- for vqa question_id, question, image,
answers) and ``metrics.json`` (the task's metrics; for vqa those of
``mllm.evaluation.metrics.TASK_METRICS``, ``num_samples`` and ``majority_baseline``: the VQA accuracy of
always answering the most frequent answer of the evaluated set; with records that carry a
``question_type`` also ``question_type_prior``, the accuracy of answering each type's most frequent
answer, and ``exact_match_by_type``), both written atomically. A run is resumable: re-running on the
same output folder skips the samples already predicted there with the same prompt and says how
many; predictions made by other weights or with another ``--max-new-tokens`` / ``--blank-images`` are
discarded, saying so (``--overwrite`` discards them always). ``--blank-images`` replaces every image by a mid-grey one of the same size: a model
whose accuracy does not drop then is not using the image. A question whose image is missing or
unreadable is skipped and counted (``num_skipped``, ``skipped`` by reason and ``skipped_questions`` in
metrics.json, a warning on the console); ``--strict`` stops at the first one. With ``--image-folder`` a
relative image path may not leave that folder. The console shows one progress bar and, at the end, a
table of the metrics (``--json``: the metrics as JSON instead).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import mllm.evaluation.tasks  # noqa: F401  (registers every task in TASKS)
from mllm.evaluation.caption_eval import CAPTION_METRICS, DEFAULT_CAPTION_METRICS
from mllm.evaluation.loop import BLANK_COLOR, TASKS, EvalOptions, Task, blank_like, results_table, run_task
from mllm.evaluation.retrieval_eval import RETRIEVAL_TASK
from mllm.evaluation.tasks.mcq import LLAVA_MCQ_INSTRUCTION
from mllm.evaluation.tasks.vqa import (
    IMAGE_POSITIONS,
    VqaSample,
    exact_match_by_type,
    load_vqa_samples,
    majority_baseline,
    prompt_turns,
    question_type_prior,
)

__all__ = [
    "BLANK_COLOR",
    "IMAGE_POSITIONS",
    "LLAVA_MCQ_INSTRUCTION",
    "LLAVA_VQA_INSTRUCTION",
    "TASKS",
    "Task",
    "VqaSample",
    "blank_like",
    "evaluate",
    "evaluate_model",
    "exact_match_by_type",
    "load_vqa_samples",
    "main",
    "majority_baseline",
    "prompt_turns",
    "question_type_prior",
    "trained_template",
]

LLAVA_VQA_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5 VQAv2/GQA suffix
_DTYPES = ("float32", "bfloat16", "float16")


def _options(
    task: str,
    image_position: str,
    instruction: str | None,
    metrics: list[str] | str | None,
    circular: bool,
    cot: bool = False,
    beams: int = 1,
    search: str = "stage",
) -> EvalOptions:
    """Check the task options before anything loads."""
    from mllm.inference.stage_beam import METHODS

    if task not in TASKS:
        raise ValueError(f"unknown task `{task}`; supported tasks: {', '.join(task_names())}.")
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}.")
    if beams > 1 and not cot:
        raise ValueError("--beams N searches a staged chain-of-thought answer: it needs --cot.")
    if search not in METHODS:
        raise ValueError(f"search `{search}` is not supported; choose one of: {', '.join(METHODS)}.")
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(
            f"image_position `{image_position}` is not supported; choose one of: {', '.join(IMAGE_POSITIONS)}."
        )
    names: tuple[str, ...] | None = None
    if metrics is not None:
        names = tuple(
            m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)
        )
        names = tuple(m for m in names if m)
        if task != "caption":
            raise ValueError(f"--metrics picks caption metrics; task `{task}` reports a fixed set.")
        unknown = [m for m in names if m not in CAPTION_METRICS]
        if unknown or not names:
            raise ValueError(
                f"unknown caption metric {unknown[0] if unknown else '(none)'!r}; choose from: "
                f"{', '.join(CAPTION_METRICS)} (default {','.join(DEFAULT_CAPTION_METRICS)})."
            )
    if circular and task != "mcq":
        raise ValueError(f"circular evaluation is for --task mcq, not `{task}`.")
    return EvalOptions(
        image_position=image_position,
        instruction=instruction,
        metrics=names,
        circular=circular,
        cot=cot,
        beams=beams,
        search=search,
    )


def default_max_new_tokens(cot: bool = False, beams: int = 1) -> int:
    """The answer length limit when none is given: 16 for a short answer, 256 for a whole staged
    answer (--cot), 96 per search step (--cot --beams N)."""
    if not cot:
        return 16
    return 256 if beams <= 1 else 96


def evaluate_model(
    model: Any,
    processor: Any,
    task: str,
    data: str,
    output: str | os.PathLike[str],
    *,
    image_folder: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    template: str | None = None,
    limit: int | None = None,
    blank_images: bool = False,
    instruction: str | None = None,
    image_position: str = "before",
    strict: bool = False,
    metrics: list[str] | str | None = None,
    circular: bool = False,
    overwrite: bool = False,
    cot: bool = False,
    beams: int = 1,
    search: str = "stage",
) -> dict[str, Any]:
    """`evaluate` on an already loaded model and processor."""
    options = _options(task, image_position, instruction, metrics, circular, cot, beams, search)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(cot, beams)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return run_task(
        TASKS.get(task),
        model,
        processor,
        data=data,
        output=output,
        image_folder=image_folder,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        template=template,
        limit=limit,
        blank_images=blank_images,
        options=options,
        strict=strict,
        overwrite=overwrite,
    )


def task_names() -> list[str]:
    """Every ``--task``: the generation tasks of :data:`TASKS`, then retrieval."""
    return [*TASKS.names(), RETRIEVAL_TASK]


def _retrieval(args: argparse.Namespace) -> dict[str, Any]:
    """`mllm eval --task retrieval`; the generation-only options are refused rather than ignored."""
    from mllm.evaluation.retrieval_eval import evaluate_retrieval

    unused = {
        "--template": args.template is not None,
        "--instruction": args.instruction is not None,
        "--blank-images": args.blank_images,
        "--metrics": args.metrics is not None,
        "--circular": args.circular,
        "--dtype": args.dtype is not None,
        "--max-new-tokens": args.max_new_tokens is not None,
        "--cot": args.cot,
        "--beams": args.beams != 1,
        "--search": args.search != "stage",
    }
    given = [flag for flag, used in unused.items() if used]
    if given:
        raise SystemExit(
            f"mllm eval: {', '.join(given)} do not apply to --task retrieval (it generates nothing)."
        )
    return evaluate_retrieval(
        args.model,
        args.data,
        args.output,
        image_folder=args.image_folder,
        batch_size=args.batch_size,
        limit=args.limit,
        rerank=args.rerank,
        strict=args.strict,
        device=args.device,
    )


def trained_template(model_path: str | os.PathLike[str]) -> str | None:
    """The ``template`` recorded in the run's ``mllm_run.json`` (None when it recorded none)."""
    from mllm.run_dir import read_record

    return read_record(model_path).config.get("template")


def evaluate(
    model_path: str,
    task: str,
    data: str,
    image_folder: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    template: str | None = None,
    limit: int | None = None,
    blank_images: bool = False,
    instruction: str | None = None,
    image_position: str = "before",
    device: str | None = None,
    dtype: str | None = None,
    strict: bool = False,
    metrics: list[str] | str | None = None,
    circular: bool = False,
    overwrite: bool = False,
    cot: bool = False,
    beams: int = 1,
    search: str = "stage",
) -> dict[str, Any]:
    """Load any output dir of `mllm train`, answer ``data`` and write ``predictions.jsonl`` and
    ``metrics.json`` into ``output`` (default ``MODEL/eval/TASK``); returns the metrics.

    ``template`` None takes the one recorded by `mllm train` in ``mllm_run.json``; when none was
    recorded (or with ``"auto"``) the tokenizer's own chat template renders the prompt.
    ``device`` defaults to CUDA when available; ``dtype`` (``float32``, ``bfloat16``, ``float16``)
    defaults to bfloat16 on CUDA and float32 elsewhere. Samples already predicted in ``output`` by the
    same model and settings are not asked again (``overwrite`` starts afresh).
    """
    import torch

    if task == RETRIEVAL_TASK:
        from mllm.evaluation.retrieval_eval import evaluate_retrieval

        return evaluate_retrieval(
            model_path, data, output, image_folder=image_folder, batch_size=batch_size, limit=limit,
            strict=strict, device=device,
        )  # fmt: skip
    _options(task, image_position, instruction, metrics, circular, cot, beams, search)  # fail before loading
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    if dtype is None:
        dtype = "bfloat16" if device is not None and str(device).startswith("cuda") else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype `{dtype}` is not supported; choose one of: {', '.join(_DTYPES)}.")
    from mllm.models.loading import load_model_and_processor

    if template is None:
        template = trained_template(model_path)
    model, processor = load_model_and_processor(model_path, device=device, dtype=getattr(torch, dtype))
    return evaluate_model(
        model,
        processor,
        task,
        data,
        output if output is not None else Path(model_path) / "eval" / task,
        image_folder=image_folder,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        template=template,
        limit=limit,
        blank_images=blank_images,
        instruction=instruction,
        image_position=image_position,
        strict=strict,
        metrics=metrics,
        circular=circular,
        overwrite=overwrite,
        cot=cot,
        beams=beams,
        search=search,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm eval",
        description="Evaluate a trained model; writes predictions.jsonl (with the prompt sent) and "
        "metrics.json, and prints a table of the metrics. The prompt asks exactly what the data asks. A "
        "training record (LLaVA conversations, messages) is scored on its last assistant turn, asked with "
        "every earlier turn as context and its <image> placeholders where they stand. Re-running on the "
        "same --output skips the samples already predicted there.",
    )
    parser.add_argument(
        "model",
        help="an output dir of `mllm train` (full weights or LoRA adapter); for --task retrieval a BLIP-2 "
        "stage-1 output dir or a CLIP / SigLIP model (local dir or Hub id)",
    )
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(task_names())}")
    parser.add_argument(
        "--data",
        required=True,
        help="the task's rows (VQA questions, COCO captions, multiple-choice or yes/no questions) or "
        "training records (LLaVA conversations, messages): json, jsonl, parquet or a datasets folder",
    )
    parser.add_argument(
        "--image-folder", default=None, help="root of relative image paths (default: the data file's folder)"
    )
    parser.add_argument("--output", default=None, help="output folder (default: MODEL/eval/TASK)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default 16; with --cot 256, and per search step 96 with --beams N)",
    )
    parser.add_argument(
        "--template",
        default=None,
        help="chat template (default: the one the run was trained with; auto: the tokenizer's own)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    parser.add_argument(
        "--blank-images", action="store_true", help="replace every image by a mid-grey one (sanity check)"
    )
    parser.add_argument(
        "--instruction",
        default=None,
        help="text appended on a new line after each question (default: none, the question exactly as in "
        f"the data); LLaVA-1.5's VQAv2/GQA suffix is {LLAVA_VQA_INSTRUCTION!r}, its MMBench one "
        f"{LLAVA_MCQ_INSTRUCTION!r}",
    )
    parser.add_argument(
        "--image-position",
        default="before",
        choices=IMAGE_POSITIONS,
        help="task rows only: the image placeholder before the question (LLaVA's eval prompts) or after "
        "it; training records keep their <image> where it stands",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first missing or unreadable image (default: skip the question and count it)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help=f"caption only: comma-separated pycocoevalcap scorers among {','.join(CAPTION_METRICS)} (default "
        f"{','.join(DEFAULT_CAPTION_METRICS)}; spice downloads Stanford CoreNLP on first use)",
    )
    parser.add_argument(
        "--circular",
        action="store_true",
        help="mcq only: MMBench circular evaluation (each question asked once per rotation of its options; "
        "right only if right every time)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the predictions already in --output (default: resume, skipping them, unless they were "
        "made by other weights or with another --max-new-tokens / --blank-images)",
    )
    parser.add_argument(
        "--cot",
        action="store_true",
        help="the model answers in LLaVA-CoT stages (<SUMMARY> <CAPTION> <REASONING> <CONCLUSION>): score "
        "the text inside <CONCLUSION> against the references (a staged reference is cut to its conclusion "
        "too); the whole answer is kept in predictions.jsonl (cot_answer)",
    )
    parser.add_argument(
        "--beams",
        type=int,
        default=1,
        metavar="N",
        help="with --cot: N candidates per search step, the best kept by the model's own pairwise "
        "knock-out judge (LLaVA-CoT's stage-level beam search); 1 (default): one greedy answer, no search",
    )
    parser.add_argument(
        "--search",
        default="stage",
        choices=("stage", "best_of_n", "sentence"),
        help="with --cot --beams N: stage-level beam search (default), best-of-N whole answers, or "
        "sentence-level beam search (LLaVA-CoT's baselines); the search trace is kept in predictions.jsonl",
    )
    parser.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="K",
        help="retrieval only: re-rank each image's and caption's ITC top-K by the Q-Former's ITM head, as "
        "BLIP-2 does (K=128 on COCO; default 0: ITC only)",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=_DTYPES,
        help="weights dtype (default: bfloat16 on CUDA, else float32)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mllm eval`; prints the metrics as a table (or as JSON with ``--json``)."""
    args = _parser().parse_args(argv)
    if args.task not in task_names():
        _parser().error(f"unknown task `{args.task}`; supported tasks: {', '.join(task_names())}.")
    if args.rerank and args.task != RETRIEVAL_TASK:
        _parser().error(f"--rerank is for --task retrieval, not `{args.task}`.")
    if args.task == RETRIEVAL_TASK:
        metrics = _retrieval(args)
        print(json.dumps(metrics, indent=2) if args.json else results_table(args.task, metrics))
        return 0
    metrics = evaluate(
        args.model,
        args.task,
        args.data,
        image_folder=args.image_folder,
        output=args.output,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        limit=args.limit,
        image_position=args.image_position,
        blank_images=args.blank_images,
        instruction=args.instruction,
        device=args.device,
        dtype=args.dtype,
        strict=args.strict,
        metrics=args.metrics,
        circular=args.circular,
        overwrite=args.overwrite,
        cot=args.cot,
        beams=args.beams,
        search=args.search,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(results_table(args.task, metrics))
    return 0
