"""Helpers shared by the data-layer tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from mllm.data.formats import Record, Turn
from mllm.models.processing_mllm import MllmProcessor

NUM_IMAGE_TOKENS = 16  # the tiny clip tower: (32 / 8)^2 patches, CLS dropped


def make_processor(
    components: dict[str, Path], llm: str, num_image_tokens: int = NUM_IMAGE_TOKENS
) -> MllmProcessor:
    return MllmProcessor.from_components(
        str(components["clip-vision"]), str(components[llm]), num_image_tokens=num_image_tokens
    )


def image(color: tuple[int, int, int] = (255, 0, 0), size: int = 40) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def record(rid: str, *pairs: tuple[str, str], images: tuple = (), system: str | None = None) -> Record:
    """A record from (user, assistant) pairs."""
    turns = [Turn("system", system)] if system else []
    for user, assistant in pairs:
        turns += [Turn("user", user), Turn("assistant", assistant)]
    return Record(rid, tuple(turns), tuple(images), f"test.json#{rid}")
