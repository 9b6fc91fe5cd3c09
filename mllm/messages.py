"""Chat messages whose content is a list of parts, as transformers processors, TRL and lmms-eval send them.

``[{"type": "image"}, {"type": "text", "text": "What is this?"}]`` becomes one string in which each
image part is the image placeholder where it stands and the parts are joined with newlines
(``"<image>\\nWhat is this?"``, LLaVA's layout), so any LLM's chat template, including those that
render ``message['content']`` as a string (ChatML, Llama, Phi, Gemma), can render it. The training
data path (`mllm.data.formats`) and the processor's ``apply_chat_template`` both go through here.
Pure Python: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IMAGE_PART_TYPES", "flatten_content", "flatten_messages"]

IMAGE_PART_TYPES = ("image", "image_url")  # OpenAI's image_url and the HF/TRL image part


def flatten_content(content: Any, placeholder: str) -> tuple[str, list[Any]]:
    """``(text, images)`` of one message's content: a string is kept as it is; a list of parts is
    joined with newlines, each image part becoming ``placeholder``. ``images`` holds what the image
    parts carry inline (``image``, ``url``, ``path`` or ``image_url.url``), in order; a part that
    carries none adds nothing there. Raises ``ValueError`` naming the part that is neither."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, Sequence):
        raise ValueError(f"content must be a string or a list of parts, got {type(content).__name__}")
    pieces: list[str] = []
    images: list[Any] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            pieces.append(placeholder)
            inline = next((part[key] for key in ("image", "url", "path") if part.get(key) is not None), None)
            if inline is None and isinstance(part.get("image_url"), dict):
                inline = part["image_url"].get("url")
            if inline is not None:
                images.append(inline)
        else:
            raise ValueError(
                f"content[{index}] must be {{'type': 'text', 'text': str}} or {{'type': 'image', ...}}, got {part!r}"
            )
    return "\n".join(pieces), images


def flatten_messages(
    messages: Sequence[dict[str, Any]], placeholder: str
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every message with string content (see :func:`flatten_content`), and the inline images of all
    of them in order. Other keys of a message are kept."""
    flat: list[dict[str, Any]] = []
    images: list[Any] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        try:
            text, found = flatten_content(message.get("content", ""), placeholder)
        except ValueError as err:
            raise ValueError(f"messages[{index}].{err}") from None
        flat.append({**message, "content": text})
        images.extend(found)
    return flat, images
