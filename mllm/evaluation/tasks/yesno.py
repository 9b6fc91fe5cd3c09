"""`--task yesno`: yes/no probes (POPE object hallucination, MME-style questions).

A row: ``question`` (or POPE's ``text``), ``label`` (or ``answer``) ``yes`` / ``no``, ``question_id`` (or
``id``), ``image``; a training record's last assistant turn is the label. The question is asked as
written (POPE's questions end "...in the image?"; nothing is added unless ``--instruction``).

How an answer is read (:func:`mllm.evaluation.yesno_metrics.parse_yes_no`): lowercase words; the first word ``yes`` or ``no`` decides;
otherwise an answer holding ``yes`` and neither ``no`` nor ``not`` is yes, one holding ``no`` or
``not`` and no ``yes`` is no; anything else is *neither* and counted apart (``num_neither``). POPE's
own script (LLaVA ``eval_pope.py``) calls every answer without no/not "yes"; here such an answer is
not credited as yes.

metrics.json, as POPE reports them with "yes" the positive class: ``accuracy`` (right / all, a
neither answer is wrong), ``precision`` (right yes / answered yes), ``recall`` (right yes / labelled
yes; a neither answer to a yes question is a miss), ``f1``, ``yes_ratio`` (answered yes / all),
``num_neither``, and the confusion counts ``tp``, ``fp``, ``tn``, ``fn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mllm.data.formats import Turn
from mllm.evaluation.loop import TASKS, EvalOptions, EvalSample
from mllm.evaluation.records import ConversationRecord, RowContext, read_eval_records, row_images
from mllm.evaluation.tasks.vqa import image_field, prompt_turns
from mllm.evaluation.yesno_metrics import parse_yes_no, yes_no_metrics

__all__ = ["YesNoTask", "load_yesno_samples"]


def _label(value: Any, source: str) -> str:
    label = str(value).strip().lower() if value is not None else ""
    if label not in ("yes", "no"):
        parsed = parse_yes_no(label)
        if parsed is None:
            raise ValueError(f"{source}: a yes/no question's label must be `yes` or `no`, got {value!r}.")
        label = parsed
    return label


def _from_row(row: dict[str, Any], ctx: RowContext) -> EvalSample | None:
    question = row.get("question", row.get("text"))
    if question is None or ("label" not in row and "answer" not in row):
        return None
    qid = row.get("question_id", row.get("id", ctx.source))
    label = _label(row.get("label", row.get("answer")), ctx.source)
    return EvalSample(str(qid), str(question), row_images(row, ctx), (label,), ctx.source,
                      meta={"category": row.get("category")})  # fmt: skip


def _from_conversation(record: ConversationRecord) -> EvalSample:
    label = _label(record.answer, record.source)
    return EvalSample(record.id, record.question, record.images, (label,), record.source, record.context,
                      meta={"category": record.raw.get("category")})  # fmt: skip


def load_yesno_samples(
    data: str, image_folder: str | None = None, limit: int | None = None
) -> list[EvalSample]:
    return list(
        read_eval_records(
            data, image_folder, limit, from_row=_from_row, from_conversation=_from_conversation,
            row_shape="a yes/no row with a `question` (or `text`) and a `label` (or `answer`)",
        )
    )  # fmt: skip


class YesNoTask:
    """POPE-style yes/no questions."""

    name = "yesno"

    def load(
        self, data: str, image_folder: str | None, limit: int | None, options: EvalOptions
    ) -> list[EvalSample]:
        return load_yesno_samples(data, image_folder, limit)

    def prompt_turns(self, sample: EvalSample, image_token: str, options: EvalOptions) -> list[Turn]:
        return prompt_turns(
            sample,
            image_token=image_token,
            image_position=options.image_position,
            instruction=options.instruction,
        )

    def fields(self, sample: EvalSample) -> dict[str, Any]:
        row = {"question": sample.question, "image": image_field(sample), "label": sample.references[0]}
        if sample.meta.get("category") is not None:
            row["category"] = sample.meta["category"]
        return row

    def score(
        self, samples: Sequence[EvalSample], predictions: Sequence[str], options: EvalOptions
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parsed = [parse_yes_no(p) for p in predictions]
        labels = [s.references[0] for s in samples]
        per_sample = [{"parsed": p, "score": float(p == y)} for p, y in zip(parsed, labels)]
        metrics: dict[str, Any] = dict(yes_no_metrics(parsed, labels))
        by_category: dict[str, tuple[list[str | None], list[str]]] = {}
        for sample, p, y in zip(samples, parsed, labels):
            if sample.meta.get("category") is not None:
                group = by_category.setdefault(str(sample.meta["category"]), ([], []))
                group[0].append(p)
                group[1].append(y)
        if by_category:  # POPE's random / popular / adversarial splits in one file
            metrics["by_category"] = {
                k: {m: v for m, v in yes_no_metrics(*g).items() if m in ("accuracy", "f1", "yes_ratio")}
                for k, g in sorted(by_category.items())
            }
        return per_sample, metrics


TASKS.add("yesno", YesNoTask())
