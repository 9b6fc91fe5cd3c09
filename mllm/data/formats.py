"""Read LLaVA json/jsonl, OpenAI-style ``messages`` and Hugging Face datasets into one ``Record`` type.

A ``Record`` is a tuple of turns (role ``system|user|assistant``, text in which every image is
the literal ``<image>``) plus the images, in placeholder order. Paths are resolved to absolute
paths; images embedded in a Hugging Face dataset stay ``PIL.Image`` objects. Anything that
cannot be trained on raises :class:`~mllm.data.errors.BadRecordError`.

LLaVA conventions followed here: https://github.com/haotian-liu/LLaVA (``llava/train/train.py``,
``LazySupervisedDataset`` and ``preprocess_multimodal``): ``from`` is ``human``/``gpt``, image
paths are relative to ``image_folder``, and a single-image record without a placeholder gets
``"<image>\\n"`` in front of its first user turn.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mllm.data.errors import BadRecordError
from mllm.io import atomic_text_file
from mllm.messages import flatten_content

__all__ = [
    "IMAGE_PLACEHOLDER",
    "ImageRef",
    "Record",
    "Turn",
    "check_record_structure",
    "load_records",
    "normalize_record",
    "read_raw_records",
    "record_to_llava",
    "save_json",
    "save_jsonl",
]

IMAGE_PLACEHOLDER = "<image>"
ImageRef = str | Image.Image  # str: resolved absolute path; PIL image: came embedded in an HF dataset

logger = logging.getLogger(__name__)

_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_ROLE_TO_LLAVA = {"user": "human", "assistant": "gpt", "system": "system"}
_MESSAGE_ROLES = ("system", "user", "assistant")
_IMAGE_KEYS = ("image", "images", "file_name")  # LLaVA, TRL/HF, imagefolder metadata.jsonl


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``system``, ``user`` or ``assistant``; images appear as ``<image>``."""

    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One normalised sample: turns, images in placeholder order, and where it came from."""

    id: str
    turns: tuple[Turn, ...]
    images: tuple[ImageRef, ...]
    source: str  # "file.json#12": file name and record index (line number for .jsonl)


# ---------------------------------------------------------------- reading files


def read_raw_records(data_path: str | os.PathLike[str]) -> list[tuple[dict[str, Any], str]]:
    """Return ``(raw record, source)`` pairs from a data file or folder.

    Accepts a ``.json`` list, ``.jsonl``, ``.parquet``, a ``datasets.save_to_disk`` folder, or an
    imagefolder-style folder with ``metadata.jsonl`` (its ``file_name`` becomes an absolute
    ``image`` path). A malformed file raises ``ValueError`` naming the file (and line).
    """
    path = Path(data_path)
    name = path.name
    if path.is_dir():
        if (path / "metadata.jsonl").is_file():
            return _read_imagefolder(path)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _read_hf_folder(path)
        raise ValueError(
            f"{path}: a data folder must be a datasets.save_to_disk folder or hold metadata.jsonl"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            with path.open(encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
            ) from err
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [(raw, f"{name}#{i}") for i, raw in enumerate(data)]
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        import datasets
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise ValueError(f"{path}: not a readable parquet file: {err}") from err
        return [(row, f"{name}#{i}") for i, row in enumerate(datasets.Dataset(table))]
    raise ValueError(
        f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl, .parquet or a folder)"
    )


def _read_jsonl(path: Path) -> list[tuple[dict[str, Any], str]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), f"{path.name}#{lineno}"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {err.msg}") from err
    return out


def _read_imagefolder(folder: Path) -> list[tuple[dict[str, Any], str]]:
    rows = _read_jsonl(folder / "metadata.jsonl")
    for raw, _ in rows:
        if isinstance(raw, dict) and "image" not in raw and "images" not in raw and "file_name" in raw:
            names = raw.pop("file_name")
            if isinstance(names, str):
                raw["image"] = str(folder.absolute() / names)
            elif isinstance(names, list) and all(isinstance(n, str) for n in names):
                raw["image"] = [str(folder.absolute() / n) for n in names]
            else:
                raw["file_name"] = names  # left for normalize_record to reject
    return [(raw, f"{folder.name}/{source}") for raw, source in rows]


def _read_hf_folder(folder: Path) -> list[tuple[dict[str, Any], str]]:
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(
                f"{folder}: holds splits {sorted(ds)}; pass the folder of one split, e.g. {folder}/train"
            )
        ds = next(iter(ds.values()))
    return [(row, f"{folder.name}#{i}") for i, row in enumerate(ds)]


# ---------------------------------------------------------------- normalising


def normalize_record(
    raw: dict[str, Any],
    source: str,
    image_folder: str | os.PathLike[str] | None = None,
    *,
    check_root: bool = True,
    allow_symlinks: bool = False,
) -> Record:
    """Turn one raw LLaVA or ``messages`` record into a :class:`Record`.

    Relative image paths are joined to ``image_folder`` and must stay inside it (else
    ``path_escapes_root``; ``check_root=False`` skips that check, for format converters), and so
    must the file a symlink inside it points to, unless ``allow_symlinks``; without
    ``image_folder`` they are resolved against the current directory.
    Raises ``BadRecordError("bad_schema")`` naming the offending key.
    """
    root = os.path.abspath(image_folder) if image_folder is not None else None
    return _normalize(
        raw,
        source,
        root=root if check_root else None,
        base_dir=root or os.getcwd(),
        allow_symlinks=allow_symlinks,
    )


def _normalize(
    raw: Any, source: str, *, root: str | None, base_dir: str, allow_symlinks: bool = False
) -> Record:
    """``root``: paths must stay inside it; ``base_dir``: where relative paths start when there is no root."""
    if not isinstance(raw, dict):
        raise BadRecordError(
            "bad_schema", source, source, f"expected a JSON object, got {type(raw).__name__}"
        )
    raw_id = raw.get("id")
    record_id = str(raw_id) if raw_id not in (None, "") else source

    def bad(reason: str, detail: str) -> BadRecordError:
        return BadRecordError(reason, record_id, source, detail)

    if raw.get("conversations") is not None:
        turns = _llava_turns(raw["conversations"], bad)
        part_images: list[Any] = []
    elif raw.get("messages") is not None:
        turns, part_images = _message_turns(raw["messages"], bad)
    else:
        raise bad("bad_schema", f"no 'conversations' or 'messages' key (keys: {', '.join(map(str, raw))})")

    key, value = next(((k, raw[k]) for k in _IMAGE_KEYS if raw.get(k) not in (None, "", [])), (None, None))
    if key is None:
        key, value = "messages", part_images
    values = value if isinstance(value, list) else [value]
    images = tuple(
        _image_ref(v, f"{key}[{i}]", root, base_dir, bad, allow_symlinks) for i, v in enumerate(values)
    )

    if len(images) == 1 and not any(IMAGE_PLACEHOLDER in t.content for t in turns):
        # LLaVA's single-image convention: the image goes in front of the first user turn
        for i, turn in enumerate(turns):
            if turn.role == "user":
                turns[i] = Turn("user", f"{IMAGE_PLACEHOLDER}\n{turn.content}")
                break
    return Record(id=record_id, turns=tuple(turns), images=images, source=source)


def _llava_turns(conversations: Any, bad: Callable[[str, str], BadRecordError]) -> list[Turn]:
    if not isinstance(conversations, list):
        raise bad("bad_schema", f"'conversations' must be a list, got {type(conversations).__name__}")
    turns = []
    for i, item in enumerate(conversations):
        if not isinstance(item, dict):
            raise bad("bad_schema", f"conversations[{i}] must be an object with 'from' and 'value'")
        who = item.get("from")
        if who not in _LLAVA_ROLES:
            raise bad("bad_schema", f"conversations[{i}].from is {who!r}; expected human, gpt or system")
        value = item.get("value")
        if not isinstance(value, str):
            raise bad("bad_schema", f"conversations[{i}].value must be a string, got {type(value).__name__}")
        turns.append(Turn(_LLAVA_ROLES[who], value))
    return turns


def _message_turns(messages: Any, bad: Callable[[str, str], BadRecordError]) -> tuple[list[Turn], list[Any]]:
    """OpenAI / TRL messages; image parts become ``<image>`` and parts are joined with newlines."""
    if not isinstance(messages, list):
        raise bad("bad_schema", f"'messages' must be a list, got {type(messages).__name__}")
    turns, images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad("bad_schema", f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in _MESSAGE_ROLES:
            raise bad("bad_schema", f"messages[{i}].role is {role!r}; expected user, assistant or system")
        content = msg.get("content")
        if isinstance(content, str):
            turns.append(Turn(role, content))
            continue
        if not isinstance(content, list):
            raise bad("bad_schema", f"messages[{i}].content must be a string or a list of parts")
        try:
            text, inline = flatten_content(content, IMAGE_PLACEHOLDER)
        except ValueError as err:
            raise bad("bad_schema", f"messages[{i}].{err}") from None
        turns.append(Turn(role, text))
        images.extend(inline)
    return turns, images


def _image_ref(
    value: Any,
    key: str,
    root: str | None,
    base_dir: str,
    bad: Callable[[str, str], BadRecordError],
    allow_symlinks: bool = False,
) -> ImageRef:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # undecoded datasets.Image value
        if value.get("bytes"):
            try:
                return Image.open(io.BytesIO(value["bytes"]))
            except (UnidentifiedImageError, OSError) as err:
                raise bad("unreadable_image", f"{key}: embedded bytes: {err}") from err
        value = value.get("path")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise bad(
            "bad_schema",
            f"{key} must be a path, a PIL image or {{'bytes', 'path'}}; got {type(value).__name__}",
        )
    if root is None:
        return os.path.normpath(os.path.join(base_dir, value))
    full = os.path.normpath(os.path.join(root, value))
    if os.path.commonpath([root, full]) != root:
        raise bad("path_escapes_root", f"{key} {value!r} resolves to {full}, outside image_folder {root}")
    if not allow_symlinks:  # a symlink inside the folder must not lead out of it either
        real, real_root = os.path.realpath(full), os.path.realpath(root)
        if os.path.commonpath([real_root, real]) != real_root:
            raise bad(
                "path_escapes_root",
                f"{key} {value!r} is a symlink to {real}, outside image_folder {root} "
                "(set allow_symlinks: true to follow it)",
            )
    return full


def check_record_structure(record: Record) -> None:
    """Raise ``BadRecordError`` unless the turns alternate and placeholders match the images.

    After optional leading system turns: user, assistant, user, ... ending with assistant.
    """

    def bad(reason: str, detail: str) -> BadRecordError:
        return BadRecordError(reason, record.id, record.source, detail)

    start = 0
    while start < len(record.turns) and record.turns[start].role == "system":
        start += 1
    body = record.turns[start:]
    if not body:
        raise bad("empty_conversation", "no user or assistant turn")
    for k, turn in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn.role != expected:
            raise bad("bad_turn_order", f"turn {start + k} is {turn.role!r}, expected {expected!r}")
    if body[-1].role != "assistant":
        raise bad("bad_turn_order", "the last turn is 'user'; a conversation must end with an assistant turn")
    placeholders = sum(t.content.count(IMAGE_PLACEHOLDER) for t in record.turns)
    if placeholders != len(record.images):
        raise bad(
            "image_count_mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER!r} placeholder(s) in the text but {len(record.images)} image(s)",
        )


def load_records(
    data_path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None = None,
    bad_data: str = "skip",
    *,
    check_images: bool = False,
    allow_symlinks: bool = False,
) -> tuple[list[Record], collections.Counter[str]]:
    """Read, normalise and check every record of ``data_path``.

    ``bad_data="strict"`` re-raises the first ``BadRecordError``; ``"skip"`` drops bad records and
    counts them by reason. Without ``image_folder``, relative paths start at the data file's
    folder. ``check_images`` also reports image files that do not exist (``missing_image``).
    """
    if bad_data not in ("skip", "strict"):
        raise ValueError(f"bad_data must be 'skip' or 'strict', got {bad_data!r}")
    path = Path(data_path)
    root = os.path.abspath(image_folder) if image_folder is not None else None
    base_dir = str((path if path.is_dir() else path.parent).absolute())
    records: list[Record] = []
    skipped: collections.Counter[str] = collections.Counter()
    first_error: dict[str, str] = {}
    raws = read_raw_records(path)
    for raw, source in raws:
        try:
            record = _normalize(raw, source, root=root, base_dir=base_dir, allow_symlinks=allow_symlinks)
            check_record_structure(record)
            if check_images:
                for ref in record.images:
                    if isinstance(ref, str) and not os.path.isfile(ref):
                        raise BadRecordError("missing_image", record.id, source, f"{ref} does not exist")
        except BadRecordError as err:
            if bad_data == "strict":
                raise
            skipped[err.reason] += 1
            first_error.setdefault(err.reason, str(err))
            continue
        records.append(record)
    if skipped:
        logger.warning(
            "skipped %d of %d records in %s: %s; first of each: %s",
            sum(skipped.values()),
            len(raws),
            path,
            dict(skipped),
            "; ".join(first_error.values()),
        )
    return records, skipped


# ---------------------------------------------------------------- writing


def record_to_llava(record: Record, image_folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Return the LLaVA json dict of ``record``; paths inside ``image_folder`` become relative.

    In-memory (PIL) images cannot be written as json: save them to files first
    (``python -m data_tools.convert hf-to-llava`` does).
    """
    root = os.path.abspath(image_folder) if image_folder is not None else None
    paths = []
    for ref in record.images:
        if not isinstance(ref, str):
            raise ValueError(
                f"record {record.id!r} ({record.source}) holds an in-memory image; save it to a file first"
            )
        if root is not None and os.path.commonpath([root, os.path.abspath(ref)]) == root:
            ref = os.path.relpath(ref, root)
        paths.append(ref)
    out: dict[str, Any] = {"id": record.id}
    if paths:
        out["image"] = paths[0] if len(paths) == 1 else paths
    out["conversations"] = [{"from": _ROLE_TO_LLAVA[t.role], "value": t.content} for t in record.turns]
    return out


def _atomic_write(path: str | os.PathLike[str], write: Callable[[io.TextIOBase], None]) -> None:
    """Write through `mllm.io`'s atomic writer (a hidden sibling renamed into place, ordinary permissions)."""
    with atomic_text_file(path) as f:
        write(f)


def save_json(obj: Any, path: str | os.PathLike[str], *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (UTF-8, not ASCII-escaped)."""
    _atomic_write(path, lambda f: (json.dump(obj, f, ensure_ascii=False, indent=indent), f.write("\n")))


def save_jsonl(rows: Iterable[Any], path: str | os.PathLike[str]) -> None:
    """Write one JSON value per line to ``path`` atomically."""
    _atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
