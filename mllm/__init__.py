"""mllm: build and fine-tune multimodal LLMs the LLaVA / BLIP-2 way.

Importing the package registers `model_type="mllm"` with transformers' Auto classes, so
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` work.
"""

from __future__ import annotations

from mllm.models import MllmConfig, MllmForConditionalGeneration, MllmProcessor, register_auto_classes

__all__ = ["MllmConfig", "MllmForConditionalGeneration", "MllmProcessor", "__version__"]
__version__ = "0.1.0"

register_auto_classes()
