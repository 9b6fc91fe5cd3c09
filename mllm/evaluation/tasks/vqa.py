"""`--task vqa`: short answers scored by exact match and the official VQA accuracy.

A VQA row: ``question_id`` (or ``id``), ``image`` (optional; a path or a list of paths), ``question``
and ``answers`` (list of strings or of ``{"answer": ...}``; a single ``answer`` string also works),
optionally ``question_type``. The prompt is ``<image>\\n{question}`` (``{question}\\n<image>`` with
``--image-position after``) unless the question already holds its ``<image>`` placeholder. A training
record is asked its last user turn with every earlier turn as context; its last assistant turn is the
answer. metrics.json: ``exact_match``, ``vqa_accuracy`` (the official vqaEval.py number),
``vqa_accuracy_normalized`` (both sides always normalised), ``majority_baseline`` and, with question
types, ``question_type_prior`` and ``exact_match_by_type``; the per-sample score is ``vqa_accuracy``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mllm.data.formats import IMAGE_PLACEHOLDER, ImageRef, Turn
from mllm.evaluation.loop import TASKS, EvalOptions
from mllm.evaluation.metrics import compute_metrics, exact_match, vqa_accuracy
from mllm.evaluation.records import ConversationRecord, RowContext, read_eval_records, row_images

__all__ = [
    "IMAGE_POSITIONS",
    "VqaSample",
    "VqaTask",
    "exact_match_by_type",
    "image_field",
    "load_vqa_samples",
    "majority_baseline",
    "prompt_turns",
    "question_type_prior",
]

logger = logging.getLogger(__name__)

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

    @property
    def id(self) -> str:
        return self.question_id

    @property
    def references(self) -> tuple[str, ...]:
        return self.answers


def _answers_of(row: dict[str, Any], source: str) -> tuple[str, ...]:
    raw = row.get("answers", row.get("answer"))
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{source}: a VQA record needs `answers` (a non-empty list) or `answer` (a string).")
    return tuple(str(a["answer"]) if isinstance(a, dict) else str(a) for a in raw)


def _qtype(row: dict[str, Any]) -> str | None:
    qtype = row.get("question_type")
    return None if qtype is None else str(qtype)


def _vqa_row(row: dict[str, Any], ctx: RowContext) -> VqaSample | None:
    if "question" not in row:
        return None
    qid = row.get("question_id", row.get("id"))
    if qid is None:
        raise ValueError(f"{ctx.source}: a VQA record needs `question_id` (or `id`).")
    images = row_images(row, ctx)
    return VqaSample(
        str(qid), str(row["question"]), images, _answers_of(row, ctx.source), ctx.source, _qtype(row)
    )


def _conversation_sample(record: ConversationRecord) -> VqaSample:
    return VqaSample(
        record.id,
        record.question,
        record.images,
        (record.answer,),
        record.source,
        _qtype(record.raw),
        record.context,
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
    return list(
        read_eval_records(
            data,
            image_folder,
            limit,
            from_row=_vqa_row,
            from_conversation=_conversation_sample,
            row_shape="a VQA row with a `question` and `answers`",
        )
    )


def prompt_turns(
    sample: Any,
    *,
    image_token: str = IMAGE_PLACEHOLDER,
    image_position: str = "before",
    instruction: str | None = None,
) -> list[Turn]:
    """The conversation to answer: the sample's context and its question as the last user turn.

    When no turn holds a placeholder (a task row), the sample's images go ``before`` or ``after`` the
    question, one ``image_token`` each; ``instruction`` (when given) follows the question on a new line.
    """
    question = sample.question
    if sample.images and not any(image_token in t.content for t in (*sample.context, Turn("user", question))):
        marks = [image_token] * len(sample.images)
        question = "\n".join([*marks, question] if image_position == "before" else [question, *marks])
    if instruction:
        question = f"{question}\n{instruction}"
    return [*sample.context, Turn("user", question)]


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


def image_field(sample: Any) -> str | list[str] | None:
    """The images of a prediction row: a path (a list of them for several); embedded ones by source."""
    names = [
        ref if isinstance(ref, str) else f"{sample.source}:image[{i}]" for i, ref in enumerate(sample.images)
    ]
    return None if not names else names[0] if len(names) == 1 else names


class VqaTask:
    """Short-answer VQA (VQAv2, GQA, TextVQA, ... or any training records)."""

    name = "vqa"

    def load(
        self, data: str, image_folder: str | None, limit: int | None, options: EvalOptions
    ) -> list[VqaSample]:
        return load_vqa_samples(data, image_folder, limit)

    def prompt_turns(self, sample: VqaSample, image_token: str, options: EvalOptions) -> list[Turn]:
        return prompt_turns(
            sample,
            image_token=image_token,
            image_position=options.image_position,
            instruction=options.instruction,
        )

    def fields(self, sample: VqaSample) -> dict[str, Any]:
        row: dict[str, Any] = {
            "question_id": sample.question_id,
            "question": sample.question,
            "image": image_field(sample),
            "answers": list(sample.answers),
        }
        if sample.question_type is not None:
            row["question_type"] = sample.question_type
        return row

    def score(
        self, samples: Sequence[VqaSample], predictions: Sequence[str], options: EvalOptions
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        references = [s.answers for s in samples]
        metrics: dict[str, Any] = compute_metrics("vqa", predictions, references)
        majority, baseline = majority_baseline(references)
        metrics["majority_baseline"] = baseline
        if any(s.question_type is not None for s in samples):
            metrics.update(
                question_type_prior=question_type_prior(samples),
                exact_match_by_type=exact_match_by_type(samples, predictions),
            )
        logger.info("majority answer %r scores %.4f VQA accuracy", majority, baseline)
        per_sample = [{"score": vqa_accuracy(p, s.answers)} for s, p in zip(samples, predictions)]
        return per_sample, metrics


TASKS.add("vqa", VqaTask())
