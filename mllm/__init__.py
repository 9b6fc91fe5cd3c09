"""mllm: build and fine-tune multimodal LLMs the LLaVA / BLIP-2 way.

Importing the package registers `model_type="mllm"` with transformers' Auto classes, so
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` work.
The registration is deferred until transformers loads its Auto classes, so `import mllm` (and the
`mllm` command's ``--help``) does not import torch; the model classes load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mllm.models import register_auto_classes_on_import

if TYPE_CHECKING:
    from mllm.models import MllmConfig, MllmForConditionalGeneration, MllmProcessor

__all__ = ["MllmConfig", "MllmForConditionalGeneration", "MllmProcessor", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("MllmConfig", "MllmForConditionalGeneration", "MllmProcessor"):
        return getattr(importlib.import_module("mllm.models"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_auto_classes_on_import()
