"""Reading evaluation files: any file `mllm train` reads, as task rows or training records.

Every task reads its data through :func:`read_eval_records`: a record with ``conversations`` (LLaVA)
or ``messages`` is a training record, normalised by ``mllm.data.formats.normalize_record`` (the
reference is its LAST assistant turn, the question the user turn before it with its ``<image>``
placeholders where they stand, every earlier turn context); any other record is the task's own row
shape, handed to the task's row reader with the folder its relative image paths resolve against.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from mllm.data.formats import ImageRef, Turn, check_record_structure, normalize_record, read_raw_records

__all__ = ["ConversationRecord", "RowContext", "read_eval_records", "resolve_image", "row_images"]

S = TypeVar("S")


@dataclass(frozen=True)
class ConversationRecord:
    """A training record as an evaluation question: its last assistant turn is the reference."""

    id: str
    question: str  # the last user turn, placeholders kept
    answer: str  # the last assistant turn
    images: tuple[ImageRef, ...]
    context: tuple[Turn, ...]  # the turns before the question
    source: str
    raw: dict[str, Any]  # the record as read (extra fields: question_type, options, ...)


@dataclass(frozen=True)
class RowContext:
    """Where a task row comes from and how its relative image paths resolve."""

    source: str  # "file.jsonl#12"
    root: Path  # --image-folder, else the data file's folder
    confine: bool  # --image-folder given: a relative path may not leave it


def resolve_image(value: Any, ctx: RowContext) -> ImageRef:
    """A row's image: a path (relative ones joined to the root, and kept inside it when confined, as
    training keeps them inside ``image_folder``), or one embedded by `datasets`."""
    if isinstance(value, dict) and value.get("bytes"):  # an undecoded datasets.Image value
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict):
        value = value.get("path")
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{ctx.source}: a record's `image` is a path (or a list of paths).")
    root = str(ctx.root.absolute())
    full = os.path.normpath(os.path.join(root, value))  # an absolute path stays as it is
    if ctx.confine and os.path.commonpath([root, full]) != root:
        raise ValueError(
            f"{ctx.source}: image {value!r} resolves to {full}, outside --image-folder {ctx.root}."
        )
    return full


def row_images(row: dict[str, Any], ctx: RowContext, key: str = "image") -> tuple[ImageRef, ...]:
    """The images of a row's ``key`` (a path, a list of them, or none)."""
    image = row.get(key)
    paths = [] if image in (None, "") else image if isinstance(image, list) else [image]
    return tuple(resolve_image(value, ctx) for value in paths)


def _conversation(
    row: dict[str, Any], source: str, image_folder: str | os.PathLike[str] | None, base: Path
) -> ConversationRecord:
    if image_folder is None:  # relative to the data file, as `mllm train` resolves them
        record = normalize_record(row, source, base, check_root=False)
    else:
        record = normalize_record(row, source, image_folder)
    check_record_structure(record)  # ends with an assistant turn; one image per placeholder
    *context, question, answer = record.turns
    return ConversationRecord(
        record.id, question.content, answer.content, record.images, tuple(context), source, row
    )


def read_eval_records(
    data: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None,
    limit: int | None,
    *,
    from_row: Callable[[dict[str, Any], RowContext], S | None],
    from_conversation: Callable[[ConversationRecord], S],
    row_shape: str,
) -> Iterator[S]:
    """The samples of ``data``, at most ``limit``: training records through ``from_conversation``, other
    dict rows through ``from_row`` (None: not its shape, an error naming ``row_shape``)."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data `{path}` does not exist.")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    base = (path if path.is_dir() else path.parent).absolute()
    root = Path(image_folder) if image_folder is not None else base
    count = 0
    for row, source in read_raw_records(path):
        if limit is not None and count >= limit:
            return
        if isinstance(row, dict) and (
            row.get("conversations") is not None or row.get("messages") is not None
        ):
            sample = from_conversation(_conversation(row, source, image_folder, base))
        else:
            sample = (
                from_row(row, RowContext(source, root, image_folder is not None))
                if isinstance(row, dict)
                else None
            )
            if sample is None:
                raise ValueError(
                    f"{source}: an evaluation record is {row_shape}, or a training record with "
                    "`conversations` (LLaVA) or `messages`."
                )
        count += 1
        yield sample
