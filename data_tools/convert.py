"""Convert caption / VQA / chat datasets to and from LLaVA json.

    python -m data_tools.convert coco-captions captions_train2017.json --output stage1.json --image-prefix train2017
    python -m data_tools.convert vqa v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --output vqa.json
    python -m data_tools.convert messages-to-llava chat.jsonl --output chat.json
    python -m data_tools.convert llava-to-messages llava.json --output chat.jsonl
    python -m data_tools.convert hf-to-llava saved_dataset/ --output data/train.json   # images -> data/images/*.png

Outputs ending in ``.jsonl`` are written one record per line, others as a json list; every
output is written atomically. Image paths stay relative to ``--image-folder`` (default: the
input file's folder; for ``hf-to-llava``: the output's folder).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_tools.cot import most_common_answer
from data_tools.synth import CAPTION_PROMPTS
from mllm.data.errors import BadRecordError
from mllm.data.formats import (
    IMAGE_PLACEHOLDER,
    Record,
    check_record_structure,
    normalize_record,
    read_raw_records,
    record_to_llava,
    save_json,
    save_jsonl,
)
from mllm.data.images import load_image

__all__ = [
    "coco_captions_to_llava",
    "hf_to_llava",
    "llava_to_messages",
    "main",
    "messages_to_llava",
    "record_to_messages",
    "vqa_to_llava",
    "write_records",
]

# VQA v2 image naming (https://visualqa.org/download.html): COCO_train2014_000000123456.jpg
DEFAULT_VQA_IMAGE_TEMPLATE = "COCO_{data_subtype}_{image_id:012d}.jpg"

Counts = collections.Counter[str]


def write_records(rows: list[dict[str, Any]], output: str | os.PathLike[str]) -> None:
    """Write ``rows`` atomically: json lines for ``*.jsonl``, else one json list."""
    if str(output).endswith(".jsonl"):
        save_jsonl(rows, output)
    else:
        save_json(rows, output)


def _caption_record(record_id: str, image: str, caption: str, prompt: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
            {"from": "gpt", "value": caption},
        ],
    }


def coco_captions_to_llava(
    annotations: dict[str, Any], image_prefix: str = "", seed: int = 0
) -> tuple[list[dict[str, Any]], Counts]:
    """COCO captions json -> stage-1 LLaVA records, one per caption (prompt drawn from LLaVA's list)."""
    rng = random.Random(seed)
    file_of = {img["id"]: img["file_name"] for img in annotations["images"]}
    rows, skipped = [], collections.Counter()
    for k, ann in enumerate(tqdm(annotations["annotations"], desc="coco-captions", disable=None)):
        file_name = file_of.get(ann.get("image_id"))
        caption = ann.get("caption")
        if file_name is None:
            skipped["unknown image_id"] += 1
            continue
        if not isinstance(caption, str) or not caption.strip():
            skipped["empty caption"] += 1
            continue
        image = f"{image_prefix.rstrip('/')}/{file_name}" if image_prefix else file_name
        record_id = f"{ann['image_id']}-{ann.get('id', k)}"
        rows.append(_caption_record(record_id, image, caption.strip(), rng.choice(CAPTION_PROMPTS)))
    return rows, skipped


def vqa_to_llava(
    questions: list[dict[str, Any]], prompt_suffix: str = "", fallback_prefix: str = "q"
) -> tuple[list[dict[str, Any]], Counts]:
    """VQA rows ``{question_id?, image, question, answers|answer}`` -> LLaVA records with the most common answer."""
    rows, skipped = [], collections.Counter()
    for i, q in enumerate(questions):
        answer = most_common_answer(q.get("answers", q.get("answer")))
        if answer is None:
            skipped["no answer"] += 1
            continue
        if not isinstance(q.get("question"), str) or not isinstance(q.get("image"), str):
            skipped["no question or image"] += 1
            continue
        qid = q.get("question_id")
        prompt = q["question"].strip() + (f"\n{prompt_suffix}" if prompt_suffix else "")
        record = _caption_record(
            str(qid) if qid is not None else f"{fallback_prefix}-{i}", q["image"], answer, prompt
        )
        rows.append(record)
    return rows, skipped


def _official_vqa(questions_file: Path, annotations_file: Path, image_template: str) -> list[dict[str, Any]]:
    """Join the official VQA v2 questions and annotations files into VQA rows."""
    qdata = json.loads(questions_file.read_text())
    answers = {
        a["question_id"]: a["answers"] for a in json.loads(annotations_file.read_text())["annotations"]
    }
    subtype = qdata.get("data_subtype", "")
    return [
        {
            "question_id": q["question_id"],
            "image": image_template.format(image_id=q["image_id"], data_subtype=subtype),
            "question": q["question"],
            "answers": answers.get(q["question_id"]),
        }
        for q in qdata["questions"]
    ]


def _content_parts(text: str) -> str | list[dict[str, str]]:
    """``"<image>\\nWhat?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What?"}]``; plain text stays a string."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def record_to_messages(record: Record, image_folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The OpenAI/TRL ``messages`` dict of ``record`` (inverse of reading one; paths as in record_to_llava)."""
    llava = record_to_llava(record, image_folder)
    out: dict[str, Any] = {"id": record.id}
    if "image" in llava:
        out["images"] = llava["image"] if isinstance(llava["image"], list) else [llava["image"]]
    out["messages"] = [{"role": t.role, "content": _content_parts(t.content)} for t in record.turns]
    return out


def _convert_records(
    input_path: Path, image_folder: Path | None, to: str
) -> tuple[list[dict[str, Any]], Counts]:
    folder = (
        image_folder
        if image_folder is not None
        else (input_path if input_path.is_dir() else input_path.parent)
    )
    rows, skipped = [], collections.Counter()
    for raw, source in tqdm(read_raw_records(input_path), desc=to, disable=None):
        try:
            record = normalize_record(raw, source, folder, check_root=False)
            check_record_structure(record)
            rows.append(
                record_to_llava(record, folder) if to == "llava" else record_to_messages(record, folder)
            )
        except BadRecordError as err:
            skipped[err.reason] += 1
        except ValueError:  # in-memory images: hf-to-llava writes them to files
            skipped["embedded image (use hf-to-llava)"] += 1
    return rows, skipped


def messages_to_llava(
    input_path: Path, image_folder: Path | None = None
) -> tuple[list[dict[str, Any]], Counts]:
    """Records in any readable format (normally ``messages``) -> LLaVA dicts, bad ones counted by reason."""
    return _convert_records(input_path, image_folder, "llava")


def llava_to_messages(
    input_path: Path, image_folder: Path | None = None
) -> tuple[list[dict[str, Any]], Counts]:
    """Records in any readable format (normally LLaVA) -> ``messages`` dicts, bad ones counted by reason."""
    return _convert_records(input_path, image_folder, "messages")


def hf_to_llava(
    input_path: Path,
    output: Path,
    image_dir: Path | None = None,
    caption_column: str | None = None,
    image_folder: Path | None = None,
) -> tuple[list[dict[str, Any]], Counts]:
    """An HF dataset (``save_to_disk`` folder or parquet) -> LLaVA dicts; embedded images saved as RGB PNG.

    With ``caption_column``, each row is a caption pair (image column + text) -> a stage-1 record.
    """
    out_dir = output.parent.absolute()
    image_dir = (image_dir or out_dir / "images").absolute()
    image_dir.mkdir(parents=True, exist_ok=True)
    base = (
        image_folder
        if image_folder is not None
        else (input_path if input_path.is_dir() else input_path.parent)
    )
    rows, skipped = [], collections.Counter()
    for i, (raw, source) in enumerate(tqdm(read_raw_records(input_path), desc="hf-to-llava", disable=None)):
        try:
            if caption_column is not None:
                caption = raw.get(caption_column) if isinstance(raw, dict) else None
                if not isinstance(caption, str) or not caption.strip():
                    raise BadRecordError(
                        "bad_schema", source, source, f"no text in column {caption_column!r}"
                    )
                prompt = CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]
                raw = {
                    **raw,
                    "conversations": _caption_record("", "", caption.strip(), prompt)["conversations"],
                }
            record = normalize_record(raw, source, base, check_root=False)
            check_record_structure(record)
            refs: list[str] = []
            for k, ref in enumerate(record.images):
                if isinstance(ref, Image.Image):
                    path = image_dir / f"{i:08d}_{k}.png"
                    load_image(ref, record_id=record.id, source=source).save(path)
                    ref = str(path)
                refs.append(ref)
            rows.append(record_to_llava(dataclasses.replace(record, images=tuple(refs)), out_dir))
        except BadRecordError as err:
            skipped[err.reason] += 1
    return rows, skipped


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "coco-captions", help="COCO captions json -> stage-1 LLaVA json (one record per caption)"
    )
    p.add_argument("annotations", type=Path, help="captions_*.json with 'images' and 'annotations'")
    p.add_argument("--image-prefix", default="", help="folder put in front of each file_name, e.g. train2017")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of caption prompt")

    p = sub.add_parser(
        "vqa", help="VQA json/jsonl (or official VQA v2 questions + annotations) -> LLaVA json"
    )
    p.add_argument(
        "questions",
        type=Path,
        help="rows {question_id?, image, question, answers|answer}, or VQA v2 questions json",
    )
    p.add_argument(
        "--annotations", type=Path, help="VQA v2 annotations json (with the official questions file)"
    )
    p.add_argument(
        "--image-template",
        default=DEFAULT_VQA_IMAGE_TEMPLATE,
        help="image path from {image_id}, {data_subtype}",
    )
    p.add_argument(
        "--prompt-suffix", default="", help='e.g. "Answer the question using a single word or phrase."'
    )

    for name, help_text in (
        ("messages-to-llava", "OpenAI/TRL messages json/jsonl -> LLaVA json"),
        ("llava-to-messages", "LLaVA json/jsonl -> messages json/jsonl"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("input", type=Path)
        p.add_argument(
            "--image-folder", type=Path, help="image paths are relative to it (default: input's folder)"
        )

    p = sub.add_parser(
        "hf-to-llava", help="HF dataset folder / parquet with an image column -> LLaVA json + PNG files"
    )
    p.add_argument("input", type=Path)
    p.add_argument("--image-dir", type=Path, help="where PNGs go (default: OUTPUT's folder/images)")
    p.add_argument("--caption-column", help="caption datasets: text column that becomes the answer")
    p.add_argument("--image-folder", type=Path, help="folder that path-valued image columns are relative to")

    for p in sub.choices.values():
        p.add_argument("--output", type=Path, required=True, help="file to write (.json list or .jsonl)")
    args = parser.parse_args(argv)

    if args.command == "coco-captions":
        rows, skipped = coco_captions_to_llava(
            json.loads(args.annotations.read_text()), args.image_prefix, args.seed
        )
    elif args.command == "vqa":
        if args.annotations is not None:
            questions = _official_vqa(args.questions, args.annotations, args.image_template)
        else:
            questions = [raw for raw, _ in read_raw_records(args.questions)]
        rows, skipped = vqa_to_llava(questions, args.prompt_suffix, args.questions.stem)
    elif args.command == "messages-to-llava":
        rows, skipped = messages_to_llava(args.input, args.image_folder)
    elif args.command == "llava-to-messages":
        rows, skipped = llava_to_messages(args.input, args.image_folder)
    else:
        rows, skipped = hf_to_llava(
            args.input, args.output, args.image_dir, args.caption_column, args.image_folder
        )
    write_records(rows, args.output)
    detail = f" ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})" if skipped else ""
    print(
        f"convert {args.command}: wrote {len(rows)} records to {args.output}; skipped {sum(skipped.values())}{detail}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
