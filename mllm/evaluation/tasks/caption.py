"""`--task caption`: image captioning scored by pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

Data, one sample per image with all its reference captions:

- COCO style: a ``.json`` object with ``images`` (``id``, ``file_name``) and ``annotations``
  (``image_id``, ``caption``), as ``captions_val2014.json`` / the Karpathy test split;
- rows with ``image``, ``captions`` (a list; or ``caption``, a string) and optionally ``id`` (or
  ``image_id``) and ``question`` (the prompt, e.g. ``"Describe the image."``);
- training records (LLaVA ``conversations``, ``messages``): the last assistant turn is a reference;
  records that share an ``id`` are one sample with all their captions (the first one's prompt).

The prompt is the image alone (``<image>``), or the row's ``question`` / the record's last user turn;
``--instruction`` appends its text on a new line (COCO has no question: pass e.g. ``--instruction
"A short image caption:"``, which is LLaVA-1.5's COCO / NoCaps / Flickr30k prompt in lmms-eval).
``--metrics bleu,meteor,rouge,cider`` (the default) picks scorers; ``spice`` is opt-in (it downloads
Stanford CoreNLP on first use). See :mod:`mllm.evaluation.caption_eval` for what happens without
Java. The per-sample score is the caption's CIDEr.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllm.data.formats import Turn
from mllm.evaluation.caption_eval import DEFAULT_CAPTION_METRICS, caption_scores
from mllm.evaluation.loop import TASKS, EvalOptions, EvalSample
from mllm.evaluation.records import (
    ConversationRecord,
    RowContext,
    read_eval_records,
    resolve_image,
    row_images,
)
from mllm.evaluation.tasks.vqa import image_field, prompt_turns

__all__ = ["CaptionTask", "load_caption_samples"]


def _coco(path: Path, image_folder: str | None) -> list[EvalSample] | None:
    """The samples of a COCO-style caption file, or None when ``path`` is not one."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        head = f.read(1)
        if head != "{":
            return None
        data = json.loads(head + f.read())
    if not (isinstance(data, dict) and "images" in data and "annotations" in data):
        return None
    base = path.parent.absolute()
    ctx = RowContext(path.name, Path(image_folder) if image_folder else base, image_folder is not None)
    captions: dict[Any, list[str]] = {}
    for note in data["annotations"]:
        captions.setdefault(note["image_id"], []).append(str(note["caption"]))
    samples = []
    for i, image in enumerate(data["images"]):
        refs = captions.get(image["id"])
        if not refs:
            continue  # an image without captions cannot be scored
        source = f"{path.name}#images[{i}]"
        samples.append(
            EvalSample(str(image["id"]), "", (resolve_image(image["file_name"], ctx),), tuple(refs), source)
        )
    return samples


def _from_row(row: dict[str, Any], ctx: RowContext) -> EvalSample | None:
    raw = row.get("captions", row.get("caption", row.get("references")))
    if raw is None:
        return None
    refs = [raw] if isinstance(raw, str) else list(raw)
    if not refs:
        raise ValueError(f"{ctx.source}: a caption row needs at least one reference caption.")
    qid = row.get("id", row.get("image_id", row.get("question_id", ctx.source)))
    question = str(row.get("question", row.get("prompt", "")) or "")
    return EvalSample(str(qid), question, row_images(row, ctx), tuple(str(c) for c in refs), ctx.source)


def _from_conversation(record: ConversationRecord) -> EvalSample:
    return EvalSample(
        record.id, record.question, record.images, (record.answer,), record.source, record.context
    )


def load_caption_samples(
    data: str, image_folder: str | None = None, limit: int | None = None
) -> list[EvalSample]:
    """One sample per image id with all its captions (the first ``limit`` samples)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    samples = _coco(Path(data), image_folder)
    if samples is None:
        rows = read_eval_records(
            data, image_folder, None, from_row=_from_row, from_conversation=_from_conversation,
            row_shape="a caption row with an `image` and `captions` (or `caption`)",
        )  # fmt: skip
        merged: dict[str, EvalSample] = {}
        for s in rows:
            first = merged.get(s.id)
            merged[s.id] = s if first is None else EvalSample(
                first.id, first.question, first.images, (*first.references, *s.references), first.source,
                first.context,
            )  # fmt: skip
        samples = list(merged.values())
    return samples if limit is None else samples[:limit]


class CaptionTask:
    """Captioning: pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (SPICE on request)."""

    name = "caption"

    def load(
        self, data: str, image_folder: str | None, limit: int | None, options: EvalOptions
    ) -> list[EvalSample]:
        return load_caption_samples(data, image_folder, limit)

    def prompt_turns(self, sample: EvalSample, image_token: str, options: EvalOptions) -> list[Turn]:
        if sample.question or sample.context:
            return prompt_turns(
                sample, image_token=image_token, image_position=options.image_position,
                instruction=options.instruction,
            )  # fmt: skip
        text = "\n".join([image_token] * len(sample.images))  # COCO: the image is the whole question
        if options.instruction:
            text = f"{text}\n{options.instruction}" if text else options.instruction
        return [Turn("user", text)]

    def fields(self, sample: EvalSample) -> dict[str, Any]:
        return {"image": image_field(sample)}

    def score(
        self, samples: Sequence[EvalSample], predictions: Sequence[str], options: EvalOptions
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if not samples:
            return [], {}
        result = caption_scores(
            predictions, [s.references for s in samples], options.metrics or DEFAULT_CAPTION_METRICS
        )
        metrics: dict[str, Any] = dict(result.scores)
        if result.skipped:
            metrics["skipped_metrics"] = dict(result.skipped)
        if result.tokenizer != "ptb":
            metrics["caption_tokenizer"] = "python stand-in for the PTB tokenizer (java not found)"
        key = "CIDEr" if "CIDEr" in result.per_sample else next(iter(result.per_sample), None)
        per_sample = [
            {"score": result.per_sample[key][i] if key else None,
             "scores": {m: v[i] for m, v in result.per_sample.items()}}
            for i in range(len(samples))
        ]  # fmt: skip
        return per_sample, metrics


TASKS.add("caption", CaptionTask())
