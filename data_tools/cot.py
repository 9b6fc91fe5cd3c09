"""Wrap (question, answer[, rationale][, caption]) records into four-stage chain-of-thought LLaVA json.

The answer format is LLaVA-CoT's (Xu et al. 2024, https://arxiv.org/abs/2411.10440):
``<SUMMARY>..</SUMMARY><CAPTION>..</CAPTION><REASONING>..</REASONING><CONCLUSION>..</CONCLUSION>``,
with the conclusion being the short answer so that exact-match evaluation still works.

    python -m data_tools.cot qa.jsonl --output cot.json [--question-key question] [--answer-key answer]
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mllm.data.formats import IMAGE_PLACEHOLDER, read_raw_records, save_json

__all__ = ["COT_STAGES", "build_cot_answer", "format_cot", "main", "most_common_answer", "wrap_record"]

COT_STAGES = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")

DEFAULT_SUMMARY = (
    "I will describe what the image shows, reason step by step about the question, and then give the answer."
)
DEFAULT_CAPTION = "The image contains the visual details that the question asks about."
DEFAULT_REASONING = (
    "The question asks: {question} Looking at the relevant part of the image, the answer is {answer}."
)


def format_cot(summary: str, caption: str, reasoning: str, conclusion: str) -> str:
    """Join the four stages as ``<SUMMARY>..</SUMMARY><CAPTION>..`` (LLaVA-CoT tags, no separators)."""
    texts = (summary, caption, reasoning, conclusion)
    return "".join(f"<{tag}>{text.strip()}</{tag}>" for tag, text in zip(COT_STAGES, texts))


def build_cot_answer(
    question: str, answer: str, rationale: str | None = None, caption: str | None = None
) -> str:
    """Return the CoT answer text; a missing rationale or caption gets a template sentence."""
    reasoning = rationale or DEFAULT_REASONING.format(question=question.strip(), answer=answer.strip())
    return format_cot(DEFAULT_SUMMARY, caption or DEFAULT_CAPTION, reasoning, answer)


def most_common_answer(value: Any) -> str | None:
    """``"red"`` -> ``"red"``; a VQA answer list (strings or ``{"answer": ..}``) -> its most common entry."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        answers = [a.get("answer") if isinstance(a, dict) else a for a in value]
        answers = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
        if answers:
            return collections.Counter(answers).most_common(1)[0][0]  # ties: first seen wins
    return None


def wrap_record(raw: dict[str, Any], fallback_id: str, keys: argparse.Namespace) -> dict[str, Any]:
    """One raw QA record -> one LLaVA record; raises ``KeyError`` naming a missing key."""
    question = raw.get(keys.question_key)
    if not isinstance(question, str) or not question.strip():
        raise KeyError(keys.question_key)
    answer = most_common_answer(raw.get(keys.answer_key))
    if answer is None:
        raise KeyError(keys.answer_key)
    rationale = raw.get(keys.rationale_key) if keys.rationale_key else None
    caption = raw.get(keys.caption_key) if keys.caption_key else None
    image = raw.get(keys.image_key)
    if image is not None and not (
        isinstance(image, str) or (isinstance(image, list) and all(isinstance(i, str) for i in image))
    ):
        raise TypeError(
            f"{keys.image_key!r} must be a path or a list of paths (convert HF datasets with `convert hf-to-llava`)"
        )
    n_images = 0 if image in (None, "", []) else len(image) if isinstance(image, list) else 1
    prompt = question.strip()
    if n_images and IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER}\n" * n_images + prompt
    record_id = raw.get(keys.id_key, raw.get("question_id"))
    out: dict[str, Any] = {"id": str(record_id) if record_id not in (None, "") else fallback_id}
    if n_images:
        out["image"] = image
    answer_text = build_cot_answer(
        question.strip(),
        answer,
        rationale if isinstance(rationale, str) else None,
        caption if isinstance(caption, str) else None,
    )
    out["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer_text}]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.cot", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="json / jsonl / parquet of QA records")
    parser.add_argument("--output", type=Path, required=True, help="LLaVA json to write")
    parser.add_argument("--question-key", default="question")
    parser.add_argument(
        "--answer-key", default="answer", help="a string, or a VQA list of answers (most common wins)"
    )
    parser.add_argument(
        "--rationale-key", default="rationale", help="optional; missing -> template reasoning"
    )
    parser.add_argument("--caption-key", default="caption", help="optional; missing -> template caption")
    parser.add_argument("--image-key", default="image", help="image path(s), kept as written")
    parser.add_argument("--id-key", default="id")
    args = parser.parse_args(argv)

    out, skipped = [], collections.Counter()
    for i, (raw, source) in enumerate(tqdm(read_raw_records(args.input), desc="cot", disable=None)):
        try:
            out.append(wrap_record(raw, f"{args.input.stem}-{i}", args))
        except KeyError as err:
            skipped[f"missing {err.args[0]}"] += 1
        except (TypeError, AttributeError) as err:
            print(f"{source}: {err}", file=sys.stderr)
            skipped["bad record"] += 1
    save_json(out, args.output)
    print(
        f"cot: wrote {len(out)} records to {args.output}; skipped {sum(skipped.values())} {dict(skipped) or ''}".rstrip()
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
