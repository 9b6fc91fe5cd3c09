"""Load one image reference as a fully decoded RGB ``PIL.Image``, or raise :class:`BadRecordError`.

Bad files are reported per record (missing / unreadable / zero-size) instead of crashing a
DataLoader worker. PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched: a
truncated file is an ``unreadable_image``, not a silently grey-padded one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from mllm.data.errors import BadRecordError

__all__ = ["load_image", "to_rgb"]

_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA", "P")  # P goes through RGBA: its palette may hold alpha
_WHITE = (255, 255, 255, 255)


def _scale_to_uint8(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float grey image to 8-bit ``L``."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0  # 65535 -> 255
    elif img.mode == "F" and arr.size and 0.0 <= arr.min() and arr.max() <= 1.0:
        arr = arr * 255.0  # float image in [0, 1]
    elif arr.size and 0.0 <= arr.min() and arr.max() <= 255.0:
        pass  # already 8-bit values stored wide
    elif arr.size and 0.0 <= arr.min() and arr.max() <= 65535.0:
        arr = arr / 257.0  # 16-bit PNG opened as mode "I"
    elif arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on white, wide grey is scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return _scale_to_uint8(img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(ref: str | os.PathLike[str] | Image.Image, *, record_id: str, source: str) -> Image.Image:
    """Return ``ref`` (a path or a PIL image) as a fully loaded RGB image.

    Raises ``BadRecordError`` with reason ``missing_image``, ``unreadable_image`` or
    ``zero_size_image``; the message names ``record_id``, ``source`` and the path.
    """
    what = os.fspath(ref) if isinstance(ref, (str, os.PathLike)) else "embedded image"

    def bad(reason: str, detail: str) -> BadRecordError:
        return BadRecordError(reason, record_id, source, detail)

    try:
        if isinstance(ref, Image.Image):
            ref.load()
            return _checked_rgb(ref, what, bad)
        if not os.path.isfile(what):
            raise bad("missing_image", f"{what} does not exist")
        with Image.open(what) as opened:
            opened.load()
            return _checked_rgb(opened, what, bad)
    except BadRecordError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # a truncated file raises OSError in load(); a corrupt header UnidentifiedImageError or SyntaxError
        raise bad("unreadable_image", f"{what}: {type(err).__name__}: {err}") from err


def _checked_rgb(img: Image.Image, what: str, bad: Callable[[str, str], BadRecordError]) -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise bad("zero_size_image", f"{what} has size {img.width}x{img.height}")
    rgb = to_rgb(img)
    return rgb.copy() if rgb is img else rgb  # detached from the (closing) file, always a fresh object
