"""Filter a LLaVA caption dataset with ALIGN / LAION-style rules.

Rules, applied in this order (a record is counted under the first rule it fails):
boilerplate alt-text, a caption shared by more than K images, caption length in words, image
unreadable / too small / too elongated, and (with ``--clip-model``) image-text cosine
similarity below ``--min-similarity``. The caption is a record's first assistant turn.

Sources: ALIGN (Jia et al. 2021, https://arxiv.org/abs/2102.05918, section 3: shorter side
>= 200 px, aspect ratio <= 3, alt-text shared by <= 10 images, 3-20 unigrams) and LAION-400M
(Schuhmann et al. 2021, https://arxiv.org/abs/2111.02114: CLIP ViT-B/32 similarity >= 0.3).

    python -m data_tools.filter captions.json --output kept.json [--image-folder DIR] \\
        [--clip-model openai/clip-vit-base-patch32 --min-similarity 0.3]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_tools.convert import write_records
from mllm.data.errors import BadRecordError
from mllm.data.formats import ImageRef, Record, check_record_structure, normalize_record, read_raw_records
from mllm.data.images import load_image

__all__ = ["RULES", "FilterOptions", "clip_similarities", "filter_records", "is_boilerplate", "main"]

RULES = (
    "bad_record",
    "boilerplate_caption",
    "shared_caption",
    "caption_too_short",
    "caption_too_long",
    "no_image",
    "unreadable_image",
    "image_too_small",
    "aspect_ratio",
    "low_similarity",
)

BOILERPLATE = frozenset(
    {
        "image", "images", "photo", "photos", "picture", "pic", "img", "untitled", "untitled image",
        "no image", "no image available", "image not found", "image unavailable", "placeholder",
        "thumbnail", "stock photo", "stock image", "default", "null", "none", "n/a", "logo", "icon",
        "banner", "screenshot", "click to enlarge", "click here", "see more", "loading", "alt text",
    }
)  # fmt: skip
_FILENAME = re.compile(r"^[\w\-. ()]+\.(jpe?g|png|gif|bmp|webp|tiff?|heic|svg)$", re.IGNORECASE)
_CAMERA_NAME = re.compile(
    r"^(img|dsc|dscn|dcim|pict?|photo|image|screenshot|untitled)[\s_-]*\d+$", re.IGNORECASE
)


@dataclass(frozen=True)
class FilterOptions:
    """Thresholds; a ``None`` disables that rule."""

    min_words: int | None = 3  # ALIGN: fewer than 3 unigrams removed
    max_words: int | None = 50  # ALIGN used 20; LLaVA-style captions run longer
    max_shared: int | None = 10  # ALIGN: alt-text shared by more than 10 images removed
    min_image_side: int | None = 64  # ALIGN used 200
    max_aspect_ratio: float | None = 3.0  # ALIGN
    clip_model: str | None = None  # path or Hub id of a CLIP / SigLIP model
    min_similarity: float = 0.3  # LAION-400M threshold for CLIP ViT-B/32
    batch_size: int = 32
    device: str = "cpu"


def _normalize_caption(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,:;!?-_'\"")


def is_boilerplate(caption: str) -> bool:
    """True for alt-text that says nothing: "image", "untitled", "IMG_1234.jpg", "DSC 0042"."""
    text = _normalize_caption(caption)
    return not text or text in BOILERPLATE or bool(_FILENAME.match(text) or _CAMERA_NAME.match(text))


def _caption(record: Record) -> str:
    return next((t.content for t in record.turns if t.role == "assistant"), "")


def _image_key(ref: ImageRef) -> Any:
    return ref if isinstance(ref, str) else id(ref)


def _image_size(ref: ImageRef) -> tuple[int, int] | None:
    """Size from the file header only (no decode); ``None`` when it cannot be read."""
    if not isinstance(ref, str):
        return ref.size
    try:
        with Image.open(ref) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def clip_similarities(
    model_name_or_path: str,
    images: Sequence[ImageRef],
    texts: Sequence[str],
    batch_size: int = 32,
    device: str = "cpu",
) -> list[float]:
    """Cosine similarity of each (image, text) pair under a CLIP / SigLIP model (``AutoModel``)."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_name_or_path).to(device).eval()
    image_processor = AutoImageProcessor.from_pretrained(
        model_name_or_path, backend="pil"
    )  # no torchvision needed
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    text_config = getattr(model.config, "text_config", model.config)
    max_length = min(tokenizer.model_max_length, getattr(text_config, "max_position_embeddings", 77))
    padding = (
        "max_length" if "siglip" in model.config.model_type else True
    )  # SigLIP was trained on padded text

    def embed(out: Any) -> torch.Tensor:  # transformers 5 returns a model output; 4.x returned the tensor
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    sims: list[float] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="clip", disable=None):
            batch_images = [
                load_image(ref, record_id="", source="") for ref in images[start : start + batch_size]
            ]
            pixels = image_processor(images=batch_images, return_tensors="pt")["pixel_values"].to(device)
            tokens = tokenizer(
                list(texts[start : start + batch_size]),
                padding=padding,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            img_emb = embed(model.get_image_features(pixel_values=pixels))  # [B, D]
            txt_emb = embed(model.get_text_features(**tokens))  # [B, D]
            sims.extend((img_emb * txt_emb).sum(-1).tolist())
    return sims


def filter_records(
    items: Sequence[tuple[Any, Record | None]], options: FilterOptions
) -> tuple[list[Any], collections.Counter[str]]:
    """Apply the rules to ``(raw, record)`` pairs (``record`` is ``None`` for a bad one).

    Returns the kept raw records (unchanged) and how many records each rule removed.
    """
    removed: collections.Counter[str] = collections.Counter({rule: 0 for rule in RULES})
    images_per_caption: dict[str, set[Any]] = collections.defaultdict(set)
    for _, record in items:
        if record is not None:
            images_per_caption[_normalize_caption(_caption(record))].update(map(_image_key, record.images))

    survivors: list[tuple[Any, Record]] = []
    for raw, record in tqdm(items, desc="filter", disable=None):
        rule = "bad_record" if record is None else _failed_rule(record, options, images_per_caption)
        if rule is None:
            survivors.append((raw, record))
        else:
            removed[rule] += 1

    if options.clip_model is not None and survivors:
        sims = clip_similarities(
            options.clip_model,
            [r.images[0] for _, r in survivors],
            [_caption(r) for _, r in survivors],
            options.batch_size,
            options.device,
        )
        removed["low_similarity"] = sum(s < options.min_similarity for s in sims)
        survivors = [pair for pair, s in zip(survivors, sims) if s >= options.min_similarity]
    return [raw for raw, _ in survivors], removed


def _failed_rule(
    record: Record, options: FilterOptions, images_per_caption: dict[str, set[Any]]
) -> str | None:
    caption = _caption(record)
    if is_boilerplate(caption):
        return "boilerplate_caption"
    if (
        options.max_shared is not None
        and len(images_per_caption[_normalize_caption(caption)]) > options.max_shared
    ):
        return "shared_caption"
    words = len(caption.split())
    if options.min_words is not None and words < options.min_words:
        return "caption_too_short"
    if options.max_words is not None and words > options.max_words:
        return "caption_too_long"
    if not record.images:
        return "no_image"
    for ref in record.images:
        size = _image_size(ref)
        if size is None:
            return "unreadable_image"
        if options.min_image_side is not None and min(size) < options.min_image_side:
            return "image_too_small"
        if options.max_aspect_ratio is not None and max(size) > options.max_aspect_ratio * max(min(size), 1):
            return "aspect_ratio"
    if options.clip_model is not None:  # the CLIP pass decodes every image: catch truncated files here
        try:
            for ref in record.images:
                load_image(ref, record_id=record.id, source=record.source)
        except BadRecordError:
            return "unreadable_image"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    defaults = FilterOptions()
    parser = argparse.ArgumentParser(prog="python -m data_tools.filter", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="LLaVA json / jsonl caption dataset")
    parser.add_argument("--output", type=Path, required=True, help="kept records (.json list or .jsonl)")
    parser.add_argument(
        "--image-folder", type=Path, help="image paths are relative to it (default: input's folder)"
    )
    parser.add_argument("--min-words", type=int, default=defaults.min_words)
    parser.add_argument("--max-words", type=int, default=defaults.max_words)
    parser.add_argument(
        "--max-shared",
        type=int,
        default=defaults.max_shared,
        help="K: a caption on more than K images is boilerplate",
    )
    parser.add_argument("--min-image-side", type=int, default=defaults.min_image_side)
    parser.add_argument("--max-aspect-ratio", type=float, default=defaults.max_aspect_ratio)
    parser.add_argument("--clip-model", help="CLIP / SigLIP path or Hub id; enables the similarity rule")
    parser.add_argument("--min-similarity", type=float, default=defaults.min_similarity)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", default=defaults.device)
    args = parser.parse_args(argv)
    options = FilterOptions(
        min_words=args.min_words,
        max_words=args.max_words,
        max_shared=args.max_shared,
        min_image_side=args.min_image_side,
        max_aspect_ratio=args.max_aspect_ratio,
        clip_model=args.clip_model,
        min_similarity=args.min_similarity,
        batch_size=args.batch_size,
        device=args.device,
    )
    folder = args.image_folder or args.input.parent
    items: list[tuple[Any, Record | None]] = []
    for raw, source in read_raw_records(args.input):
        try:
            record = normalize_record(
                raw, source, os.fspath(folder), check_root=args.image_folder is not None
            )
            check_record_structure(record)
        except BadRecordError:
            record = None
        items.append((raw, record))
    kept, removed = filter_records(items, options)
    write_records(kept, args.output)
    rules = ", ".join(
        f"{rule} {n}" for rule, n in removed.items() if rule != "low_similarity" or options.clip_model
    )
    print(f"filter: kept {len(kept)} of {len(items)} records -> {args.output}; removed by rule: {rules}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
