"""`mllm eval`: run a trained model on an evaluation file and write predictions and metrics.

    mllm eval MODEL --task vqa --data FILE [--image-folder DIR] [--output DIR] [--batch-size N]
                    [--max-new-tokens N] [--template NAME] [--limit N] [--blank-images]
                    [--instruction TEXT] [--image-position before|after]

VQA files are json (a list) or jsonl, one question per record: ``question_id`` (or ``id``),
``image`` (relative to ``--image-folder``, default the data file's folder), ``question`` and
``answers`` (list of strings or of ``{"answer": ...}``; a single ``answer`` string also works).
The prompt is ``<image>\\n{question}\\n{instruction}`` (``{question}\\n<image>\\n{instruction}`` with
``--image-position after``, for models trained with the image after the question) rendered with the
chat template; the default instruction is LLaVA-1.5's short-answer suffix (``llava/eval`` question files,
https://github.com/haotian-liu/LLaVA/blob/main/docs/Evaluation.md); ``--instruction ""`` drops it.

The output folder receives ``predictions.jsonl`` (question_id, question, image, prediction, answers)
and ``metrics.json`` (``exact_match``, ``vqa_accuracy``, ``num_samples`` and ``majority_baseline``:
the VQA accuracy of always answering the most frequent answer of the evaluated set; with records that
carry a ``question_type`` also ``question_type_prior``, the accuracy of answering each type's most
frequent answer, and ``exact_match_by_type``), both written
atomically. ``--blank-images`` replaces every image by a mid-grey one of the same size: a model
whose accuracy does not drop then is not using the image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mllm.evaluation.metrics import compute_metrics, exact_match, normalize_answer, vqa_accuracy
from mllm.registry import Registry

__all__ = [
    "DEFAULT_VQA_INSTRUCTION",
    "TASKS",
    "TaskRunner",
    "VqaSample",
    "blank_like",
    "evaluate",
    "evaluate_model",
    "exact_match_by_type",
    "load_vqa_samples",
    "main",
    "majority_baseline",
    "question_type_prior",
    "trained_template",
]

logger = logging.getLogger(__name__)

DEFAULT_VQA_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5 VQAv2/GQA suffix
BLANK_COLOR = (128, 128, 128)  # mid-grey of --blank-images
_DTYPES = ("float32", "bfloat16", "float16")
IMAGE_POSITIONS = ("before", "after")  # the image placeholder's place relative to the question


@dataclass(frozen=True)
class VqaSample:
    """One evaluation question; ``image`` is a resolved path (or None for a text-only question)."""

    question_id: str
    question: str
    image: str | None
    answers: tuple[str, ...]
    source: str  # "file.jsonl#12", for error messages
    question_type: str | None = None  # VQA's `question_type`, when the file gives one


def _read_rows(path: Path) -> list[tuple[dict[str, Any], str]]:
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data `{path}` does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"{path.name}#{number}"))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path.name} line {number} is not valid JSON: {err}") from err
        return rows
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"`{path}` must hold a JSON list of questions (or be .jsonl).")
    return [(row, f"{path.name}#{index}") for index, row in enumerate(data)]


def _answers_of(row: dict[str, Any], source: str) -> tuple[str, ...]:
    raw = row.get("answers", row.get("answer"))
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{source}: a VQA record needs `answers` (a non-empty list) or `answer` (a string).")
    return tuple(str(a["answer"]) if isinstance(a, dict) else str(a) for a in raw)


def load_vqa_samples(
    data: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[VqaSample]:
    """Read a VQA json/jsonl file; relative image paths resolve against ``image_folder``, else the
    data file's folder. ``limit`` keeps the first N questions."""
    path = Path(data)
    root = Path(image_folder) if image_folder is not None else path.parent
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    samples: list[VqaSample] = []
    for row, source in _read_rows(path):
        if limit is not None and len(samples) >= limit:
            break
        if not isinstance(row, dict) or "question" not in row:
            raise ValueError(f"{source}: a VQA record is an object with a `question`.")
        qid = row.get("question_id", row.get("id"))
        if qid is None:
            raise ValueError(f"{source}: a VQA record needs `question_id` (or `id`).")
        image = row.get("image")
        if isinstance(image, list):
            image = image[0] if len(image) == 1 else None
            if image is None:
                raise ValueError(f"{source}: a VQA record takes one image.")
        resolved = None if image is None else str(Path(image) if os.path.isabs(image) else root / image)
        qtype = row.get("question_type")
        samples.append(
            VqaSample(
                str(qid),
                str(row["question"]),
                resolved,
                _answers_of(row, source),
                source,
                None if qtype is None else str(qtype),
            )
        )
    return samples


def blank_like(image: Image.Image) -> Image.Image:
    """A mid-grey RGB image of the same size as ``image``."""
    return Image.new("RGB", image.size, BLANK_COLOR)


def majority_baseline(answers: Sequence[Sequence[str]]) -> tuple[str, float]:
    """The most frequent answer of the set (each question votes with its own most common normalised
    answer) and the mean VQA accuracy of always answering it."""
    if not answers:
        return "", 0.0
    per_question = [Counter(normalize_answer(a) for a in refs).most_common(1)[0][0] for refs in answers]
    answer = Counter(per_question).most_common(1)[0][0]
    return answer, sum(vqa_accuracy(answer, refs) for refs in answers) / len(answers)


def question_type_prior(samples: Sequence[VqaSample]) -> float:
    """VQA accuracy of answering each question with its type's most frequent answer (the
    "per Q-type prior" baseline of Antol et al., 2015): what the question alone gives away.
    Questions without a type form one group."""
    if not samples:
        return 0.0
    by_type: dict[str | None, list[tuple[str, ...]]] = {}
    for sample in samples:
        by_type.setdefault(sample.question_type, []).append(sample.answers)
    total = sum(majority_baseline(group)[1] * len(group) for group in by_type.values())
    return total / len(samples)


def exact_match_by_type(samples: Sequence[VqaSample], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match per ``question_type`` (empty when the file gives no types)."""
    hits: dict[str, list[float]] = {}
    for sample, prediction in zip(samples, predictions):
        if sample.question_type is not None:
            hits.setdefault(sample.question_type, []).append(exact_match(prediction, sample.answers))
    return {qtype: sum(v) / len(v) for qtype, v in sorted(hits.items())}


def _load_images(sample: VqaSample, blank: bool) -> list[Image.Image]:
    from mllm.data.images import load_image

    if sample.image is None:
        return []
    image = load_image(sample.image, record_id=sample.question_id, source=sample.source)
    return [blank_like(image) if blank else image]


def run_vqa(
    model: Any,
    processor: Any,
    *,
    data: str,
    image_folder: str | None,
    batch_size: int,
    max_new_tokens: int,
    template: str | None,
    limit: int | None,
    blank_images: bool,
    instruction: str,
    image_position: str = "before",
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Answer every question of ``data``; returns prediction rows and metrics."""
    from tqdm.auto import tqdm

    from mllm.inference.generate import build_generation_prompt, generate_answers

    samples = load_vqa_samples(data, image_folder, limit)
    placeholder = processor.image_token
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(samples), desc="eval vqa", unit="q") as progress:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            prompts = []
            for sample in batch:
                image = [placeholder] if sample.image is not None else []
                parts = [*image, sample.question] if image_position == "before" else [sample.question, *image]
                parts += [instruction] if instruction else []
                prompts.append(build_generation_prompt("\n".join(parts), processor.tokenizer, template))
            images = [_load_images(sample, blank_images) for sample in batch]
            predictions = generate_answers(
                model, processor, prompts, images, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            for image_list in images:
                for image in image_list:
                    image.close()
            rows.extend(
                {
                    "question_id": s.question_id,
                    "question": s.question,
                    "image": s.image,
                    "prediction": p,
                    "answers": list(s.answers),
                    **({"question_type": s.question_type} if s.question_type is not None else {}),
                }
                for s, p in zip(batch, predictions)
            )
            progress.update(len(batch))
    references = [s.answers for s in samples]
    predictions = [r["prediction"] for r in rows]
    metrics = compute_metrics("vqa", predictions, references)
    majority, baseline = majority_baseline(references)
    metrics.update(num_samples=len(samples), majority_baseline=baseline)
    if any(s.question_type is not None for s in samples):
        metrics.update(
            question_type_prior=question_type_prior(samples),
            exact_match_by_type=exact_match_by_type(samples, predictions),
        )
    logger.info("majority answer %r scores %.4f VQA accuracy", majority, baseline)
    return rows, metrics


TaskRunner = Callable[..., tuple[list[dict[str, Any]], dict[str, float]]]
"""``(model, processor, *, data, image_folder, batch_size, max_new_tokens, template, limit,
blank_images, instruction, image_position) -> (prediction rows, metrics)``."""

TASKS: Registry[TaskRunner] = Registry("evaluation task")
TASKS.add("vqa", run_vqa)


def evaluate_model(
    model: Any,
    processor: Any,
    task: str,
    data: str,
    output: str | os.PathLike[str],
    *,
    image_folder: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    template: str | None = None,
    limit: int | None = None,
    blank_images: bool = False,
    instruction: str = DEFAULT_VQA_INSTRUCTION,
    image_position: str = "before",
) -> dict[str, float]:
    """`evaluate` on an already loaded model and processor."""
    from mllm.data.formats import save_json, save_jsonl

    runner = TASKS.get(task)  # fails listing the supported tasks
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    _check_image_position(image_position)
    rows, metrics = runner(
        model,
        processor,
        data=data,
        image_folder=image_folder,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        template=template,
        limit=limit,
        blank_images=blank_images,
        instruction=instruction,
        image_position=image_position,
    )
    output = Path(output)
    save_jsonl(rows, output / "predictions.jsonl")
    save_json(metrics, output / "metrics.json")
    return metrics


def _check_image_position(image_position: str) -> None:
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(
            f"image_position `{image_position}` is not supported; choose one of: {', '.join(IMAGE_POSITIONS)}."
        )


def trained_template(model_path: str | os.PathLike[str]) -> str | None:
    """The ``template`` recorded in the run's ``mllm_run.json`` (None when it recorded none)."""
    from mllm.training.checkpoint import read_run_record

    return (read_run_record(model_path).get("config") or {}).get("template")


def evaluate(
    model_path: str,
    task: str,
    data: str,
    image_folder: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    template: str | None = None,
    limit: int | None = None,
    blank_images: bool = False,
    instruction: str = DEFAULT_VQA_INSTRUCTION,
    image_position: str = "before",
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, float]:
    """Load any output dir of `mllm train`, answer ``data`` and write ``predictions.jsonl`` and
    ``metrics.json`` into ``output`` (default ``MODEL/eval/TASK``); returns the metrics.

    ``template`` None takes the one recorded by `mllm train` in ``mllm_run.json``; when none was
    recorded (or with ``"auto"``) the tokenizer's own chat template renders the prompt.
    ``device`` defaults to CUDA when available; ``dtype`` (``float32``, ``bfloat16``, ``float16``)
    defaults to bfloat16 on CUDA and float32 elsewhere.
    """
    import torch

    TASKS.get(task)  # fail on an unknown task or argument before loading anything
    _check_image_position(image_position)
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
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm eval",
        description="Evaluate a trained model; writes predictions.jsonl and metrics.json.",
    )
    parser.add_argument("model", help="an output dir of `mllm train` (full weights or LoRA adapter)")
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS.names())}")
    parser.add_argument("--data", required=True, help="evaluation file (json or jsonl)")
    parser.add_argument(
        "--image-folder", default=None, help="root of relative image paths (default: the data file's folder)"
    )
    parser.add_argument("--output", default=None, help="output folder (default: MODEL/eval/TASK)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit")
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
        "--instruction", default=DEFAULT_VQA_INSTRUCTION, help='appended after the question ("" for none)'
    )
    parser.add_argument(
        "--image-position",
        default="before",
        choices=IMAGE_POSITIONS,
        help="image placeholder before the question (LLaVA's eval prompts) or after it",
    )
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
    """Entry point of `mllm eval`; prints the metrics as JSON."""
    args = _parser().parse_args(argv)
    if args.task not in TASKS:
        _parser().error(f"unknown task `{args.task}`; supported tasks: {', '.join(TASKS.names())}.")
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
    )
    print(json.dumps(metrics, indent=2))
    return 0
