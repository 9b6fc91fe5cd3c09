"""Atomic file and folder writes: a crash mid-write never leaves a half-written file in place.

Every write goes to a hidden sibling (``.NAME.partial-`` and 8 random hex digits) on the same filesystem and is renamed
over the destination when complete. Files get the permissions of an ordinary ``open()`` (0666 less
the umask), unlike ``tempfile.mkstemp``'s 0600, so a run dir's files all look alike.
``remove_partials`` clears what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "PARTIAL",
    "atomic_dir",
    "atomic_text_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "give_ordinary_permissions",
    "remove_partials",
]

PARTIAL = ".partial-"  # marks a staging file or folder: `.NAME.partial-` + 8 hex digits
_OLD = ".old-"  # a destination moved aside while its replacement is renamed in


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}{kind}{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike[str], mode: str, **open_kwargs: Any) -> Iterator[Any]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, PARTIAL)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_text_file(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Any]:
    """A UTF-8 text file to write into (``with atomic_text_file(p) as f: ...``); it replaces ``path``
    only when the block completes, so large outputs stream without being held in memory."""
    return _atomic_file(path, "w", encoding="utf-8", newline="\n")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, then rename it into place."""
    with _atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """``obj`` as JSON (UTF-8, keys sorted, trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=True) + "\n")


def _ordinary_mode(folder: Path) -> int:
    """The mode ``open()`` gives a new file in ``folder`` (0666 less the umask), read without touching the umask."""
    probe = _sibling(folder / "mode-probe", PARTIAL)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def give_ordinary_permissions(path: str | os.PathLike[str]) -> None:
    """chmod ``path`` (a file, or every file under a folder) to ``open()``'s mode: writers such as
    safetensors and ``mkstemp`` create 0600 files, which would stand out among a run dir's files."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    if not files:
        return
    mode = _ordinary_mode(path.parent if path.is_file() else path)
    for file in files:
        if file.stat().st_mode & 0o777 != mode:
            os.chmod(file, mode)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging dir beside ``final``; on success it replaces ``final`` by rename, on error it is removed.

    A crash while writing therefore leaves whatever ``final`` held before intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(final, PARTIAL)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        trash = _sibling(final, _OLD)
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def remove_partials(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the staging files and folders that a killed atomic write left in ``folder`` (only those
    of destination ``name`` when given); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefix = "." if name is None else f".{name}."
    removed = []
    for item in folder.iterdir():
        if item.name.startswith(prefix) and (PARTIAL in item.name or _OLD in item.name):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed
