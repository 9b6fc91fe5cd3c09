"""`mllm eval`: run a trained model on an evaluation file and write predictions and metrics.

    mllm eval MODEL --task vqa --data FILE [--image-folder DIR] [--output DIR] [--batch-size N]
                    [--max-new-tokens N] [--template NAME] [--limit N] [--blank-images]
                    [--instruction TEXT] [--image-position before|after] [--strict]

``--data`` is read as `mllm train` reads it (``mllm.data.formats.read_raw_records``: json list,
jsonl, parquet, a ``datasets.save_to_disk`` folder, an imagefolder with ``metadata.jsonl``), one
sample per record, in either of two shapes:

- a VQA row: ``question_id`` (or ``id``), ``image`` (optional; a path or a list of paths),
  ``question`` and ``answers`` (list of strings or of ``{"answer": ...}``; a single ``answer`` string
  also works), optionally ``question_type``. The prompt is ``<image>\\n{question}``
  (``{question}\\n<image>`` with ``--image-position after``) unless the question already holds its
  ``<image>`` placeholder;
- a training record (LLaVA ``conversations`` from human/gpt, or ``messages`` with role/content,
  content a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts),
  normalised by ``mllm.data.formats.normalize_record``: the reference answer is the LAST assistant
  turn, the question is the user turn before it with its ``<image>`` placeholders where they stand,
  and every earlier turn (system, user, assistant) is context in the prompt. All images of the record
  go to the model in placeholder order.

Relative image paths resolve against ``--image-folder`` (default: the data file's folder). The prompt
is rendered with the chat template the model was trained with and asks exactly what the data asks:
``--instruction TEXT`` appends ``\\n{TEXT}`` to the question only when given. LLaVA-1.5 evaluates
VQAv2, GQA and other short-answer benchmarks with :data:`LLAVA_VQA_INSTRUCTION` ("Answer the question
using a single word or phrase.", ``llava/eval`` question files,
https://github.com/haotian-liu/LLaVA/blob/main/docs/Evaluation.md); pass it for a model trained on
such prompts.

The output folder receives ``predictions.jsonl`` (question_id, question, image, prompt: the text sent
to the model, prediction, answers) and ``metrics.json`` (the task's metrics from
``mllm.evaluation.metrics.TASK_METRICS``, ``num_samples`` and ``majority_baseline``: the VQA accuracy
of always answering the most frequent answer of the evaluated set; with records that carry a
``question_type`` also ``question_type_prior``, the accuracy of answering each type's most frequent
answer, and ``exact_match_by_type``), both written atomically. ``--blank-images`` replaces every image
by a mid-grey one of the same size: a model whose accuracy does not drop then is not using the image.
A question whose image is missing or unreadable is skipped and counted (``num_skipped``, ``skipped``
by reason and ``skipped_questions`` in metrics.json, a warning on the console); ``--strict`` stops at
the first one. With ``--image-folder`` a relative image path may not leave that folder.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mllm.data.formats import (
    IMAGE_PLACEHOLDER,
    ImageRef,
    Turn,
    check_record_structure,
    normalize_record,
    read_raw_records,
)
from mllm.evaluation.metrics import compute_metrics, exact_match, vqa_accuracy
from mllm.registry import Registry

__all__ = [
    "IMAGE_POSITIONS",
    "LLAVA_VQA_INSTRUCTION",
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
    "prompt_turns",
    "question_type_prior",
    "trained_template",
]

logger = logging.getLogger(__name__)

LLAVA_VQA_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5 VQAv2/GQA suffix
BLANK_COLOR = (128, 128, 128)  # mid-grey of --blank-images
_DTYPES = ("float32", "bfloat16", "float16")
IMAGE_POSITIONS = ("before", "after")  # a VQA row's image placeholder, relative to its question


@dataclass(frozen=True)
class VqaSample:
    """One evaluation question: a VQA row, or the last assistant turn of a training record.

    ``images`` are resolved paths (or images embedded in a Hugging Face dataset) in placeholder order.
    """

    question_id: str
    question: str  # as in the data; a record's last user turn keeps its `<image>` placeholders
    images: tuple[ImageRef, ...]
    answers: tuple[str, ...]
    source: str  # "file.jsonl#12", for error messages
    question_type: str | None = None  # VQA's `question_type`, when the file gives one
    context: tuple[Turn, ...] = ()  # a record's turns before the question (system, user, assistant)


def _answers_of(row: dict[str, Any], source: str) -> tuple[str, ...]:
    raw = row.get("answers", row.get("answer"))
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{source}: a VQA record needs `answers` (a non-empty list) or `answer` (a string).")
    return tuple(str(a["answer"]) if isinstance(a, dict) else str(a) for a in raw)


def _vqa_image(value: Any, root: Path, source: str, confine: bool = False) -> ImageRef:
    """A VQA row's image: a path (relative ones joined to ``root``, and kept inside it when
    ``confine``, as training keeps them inside ``image_folder``), or one embedded by `datasets`."""
    if isinstance(value, dict) and value.get("bytes"):  # an undecoded datasets.Image value
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict):
        value = value.get("path")
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: a VQA record's `image` is a path (or a list of paths).")
    full = os.path.normpath(os.path.join(root.absolute(), value))  # an absolute path stays as it is
    if confine and os.path.commonpath([str(root.absolute()), full]) != str(root.absolute()):
        raise ValueError(f"{source}: image {value!r} resolves to {full}, outside --image-folder {root}.")
    return full


def _vqa_row(row: dict[str, Any], source: str, root: Path, confine: bool = False) -> VqaSample:
    qid = row.get("question_id", row.get("id"))
    if qid is None:
        raise ValueError(f"{source}: a VQA record needs `question_id` (or `id`).")
    image = row.get("image")
    paths = [] if image in (None, "") else image if isinstance(image, list) else [image]
    images = tuple(_vqa_image(value, root, source, confine) for value in paths)
    qtype = row.get("question_type")
    return VqaSample(
        str(qid),
        str(row["question"]),
        images,
        _answers_of(row, source),
        source,
        None if qtype is None else str(qtype),
    )


def _conversation_row(
    row: dict[str, Any], source: str, image_folder: str | os.PathLike[str] | None, base: Path
) -> VqaSample:
    """The last assistant turn of a LLaVA / messages record, asked with every turn before it."""
    if image_folder is None:  # relative to the data file, as `mllm train` resolves them
        record = normalize_record(row, source, base, check_root=False)
    else:
        record = normalize_record(row, source, image_folder)
    check_record_structure(record)  # ends with an assistant turn; one image per placeholder
    *context, question, answer = record.turns
    qtype = row.get("question_type")
    return VqaSample(
        record.id,
        question.content,
        record.images,
        (answer.content,),
        source,
        None if qtype is None else str(qtype),
        tuple(context),
    )


def load_vqa_samples(
    data: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[VqaSample]:
    """Read every record of ``data`` (any file or folder `mllm train` reads) as a question.

    A record with ``conversations`` or ``messages`` is a training record (its last assistant turn is
    the reference, the turns before it the prompt); otherwise it is a VQA row with ``question`` and
    ``answers``. Relative image paths resolve against ``image_folder``, else the data file's folder.
    ``limit`` keeps the first N questions.
    """
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data `{path}` does not exist.")
    base = (path if path.is_dir() else path.parent).absolute()
    root = Path(image_folder) if image_folder is not None else base
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    samples: list[VqaSample] = []
    for row, source in read_raw_records(path):
        if limit is not None and len(samples) >= limit:
            break
        if isinstance(row, dict) and (
            row.get("conversations") is not None or row.get("messages") is not None
        ):
            samples.append(_conversation_row(row, source, image_folder, base))
        elif isinstance(row, dict) and "question" in row:
            samples.append(_vqa_row(row, source, root, confine=image_folder is not None))
        else:
            raise ValueError(
                f"{source}: an evaluation record is a VQA row with a `question` and `answers`, or a training "
                "record with `conversations` (LLaVA) or `messages`."
            )
    return samples


def prompt_turns(
    sample: VqaSample,
    *,
    image_token: str = IMAGE_PLACEHOLDER,
    image_position: str = "before",
    instruction: str | None = None,
) -> list[Turn]:
    """The conversation to answer: the sample's context and its question as the last user turn.

    When no turn holds a placeholder (a VQA row), the sample's images go ``before`` or ``after`` the
    question, one ``image_token`` each; ``instruction`` (when given) follows the question on a new line.
    """
    question = sample.question
    if sample.images and not any(image_token in t.content for t in (*sample.context, Turn("user", question))):
        marks = [image_token] * len(sample.images)
        question = "\n".join([*marks, question] if image_position == "before" else [question, *marks])
    if instruction:
        question = f"{question}\n{instruction}"
    return [*sample.context, Turn("user", question)]


def blank_like(image: Image.Image) -> Image.Image:
    """A mid-grey RGB image of the same size as ``image``."""
    return Image.new("RGB", image.size, BLANK_COLOR)


def majority_baseline(answers: Sequence[Sequence[str]]) -> tuple[str, float]:
    """The most frequent answer of the set (each question votes with its own most common answer, as
    written: the official VQA accuracy compares agreeing answers unnormalised) and the mean VQA
    accuracy of always answering it."""
    if not answers:
        return "", 0.0
    per_question = [Counter(a.strip() for a in refs).most_common(1)[0][0] for refs in answers]
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
    """The sample's images, decoded (mid-grey ones with ``blank``); raises ``BadRecordError``
    (missing / unreadable / zero-size) naming the question and the file."""
    from mllm.data.images import load_image

    images = []
    for ref in sample.images:
        image = load_image(ref, record_id=sample.question_id, source=sample.source)
        if blank:
            grey = blank_like(image)
            image.close()
            image = grey
        images.append(image)
    return images


def _image_field(sample: VqaSample) -> str | list[str] | None:
    """The images of a prediction row: a path (a list of them for several); embedded ones by source."""
    names = [
        ref if isinstance(ref, str) else f"{sample.source}:image[{i}]" for i, ref in enumerate(sample.images)
    ]
    return None if not names else names[0] if len(names) == 1 else names


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
    instruction: str | None = None,
    image_position: str = "before",
    strict: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Answer every question of ``data``; returns prediction rows and metrics. A question whose image
    is missing or unreadable is skipped and counted (``num_skipped``, ``skipped`` by reason,
    ``skipped_questions``), or with ``strict`` stops the run with its error."""
    from tqdm.auto import tqdm

    from mllm.data.errors import BadRecordError
    from mllm.data.templates import end_of_turn_token_ids
    from mllm.inference.generate import build_generation_prompt, generate_answers

    samples = load_vqa_samples(data, image_folder, limit)
    skipped: list[dict[str, str]] = []  # questions whose image could not be read
    answered: list[VqaSample] = []
    stop_ids = end_of_turn_token_ids(processor.tokenizer, template)  # the answer ends where training ended it
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(samples), desc="eval vqa", unit="q") as progress:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch, images = [], []
            for sample in chunk:
                try:
                    images.append(_load_images(sample, blank_images))
                except BadRecordError as err:
                    if strict:
                        raise
                    skipped.append(
                        {"question_id": sample.question_id, "reason": err.reason, "detail": str(err)}
                    )
                    logger.warning("skipped question %s: %s", sample.question_id, err)
                    continue
                batch.append(sample)
            progress.update(len(chunk) - len(batch))  # the skipped ones
            if not batch:
                continue
            answered.extend(batch)
            prompts = [
                build_generation_prompt(
                    prompt_turns(
                        sample,
                        image_token=processor.image_token,
                        image_position=image_position,
                        instruction=instruction,
                    ),
                    processor.tokenizer,
                    template,
                )
                for sample in batch
            ]
            predictions = generate_answers(
                model,
                processor,
                prompts,
                images,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                stop_token_ids=stop_ids,
            )
            for image_list in images:
                for image in image_list:
                    image.close()
            rows.extend(
                {
                    "question_id": s.question_id,
                    "question": s.question,
                    "image": _image_field(s),
                    "prompt": prompt,
                    "prediction": p,
                    "answers": list(s.answers),
                    **({"question_type": s.question_type} if s.question_type is not None else {}),
                }
                for s, prompt, p in zip(batch, prompts, predictions)
            )
            progress.update(len(batch))
    samples = answered
    references = [s.answers for s in samples]
    predictions = [r["prediction"] for r in rows]
    metrics = compute_metrics("vqa", predictions, references)
    majority, baseline = majority_baseline(references)
    metrics.update(num_samples=len(samples), majority_baseline=baseline, num_skipped=len(skipped))
    if skipped:
        metrics.update(skipped=dict(Counter(s["reason"] for s in skipped)), skipped_questions=skipped)
        logger.warning(
            "skipped %d of %d questions whose image could not be read (%s); metrics are over the other %d. "
            "--strict stops at the first one instead.",
            len(skipped),
            len(skipped) + len(samples),
            ", ".join(f"{k}: {v}" for k, v in metrics["skipped"].items()),
            len(samples),
        )
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
    instruction: str | None = None,
    image_position: str = "before",
    strict: bool = False,
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
        strict=strict,
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
    from mllm.run_dir import read_record

    return read_record(model_path).config.get("template")


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
    instruction: str | None = None,
    image_position: str = "before",
    device: str | None = None,
    dtype: str | None = None,
    strict: bool = False,
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
        strict=strict,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm eval",
        description="Evaluate a trained model; writes predictions.jsonl (with the prompt sent) and "
        "metrics.json. The prompt asks exactly what the data asks. A training record (LLaVA conversations, "
        "messages) is scored on its last assistant turn, asked with every earlier turn as context and its "
        "<image> placeholders where they stand.",
    )
    parser.add_argument("model", help="an output dir of `mllm train` (full weights or LoRA adapter)")
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS.names())}")
    parser.add_argument(
        "--data",
        required=True,
        help="VQA rows or training records (LLaVA conversations, messages): json, jsonl, parquet or a "
        "datasets folder",
    )
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
        "--instruction",
        default=None,
        help="text appended on a new line after each question (default: none, the question exactly as in "
        f"the data); LLaVA-1.5's VQAv2/GQA suffix is {LLAVA_VQA_INSTRUCTION!r}",
    )
    parser.add_argument(
        "--image-position",
        default="before",
        choices=IMAGE_POSITIONS,
        help="VQA rows only: the image placeholder before the question (LLaVA's eval prompts) or after "
        "it; training records keep their <image> where it stands",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first missing or unreadable image (default: skip the question and count it)",
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
        strict=args.strict,
    )
    print(json.dumps(metrics, indent=2))
    return 0
