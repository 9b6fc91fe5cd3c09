"""mllm: build and fine-tune multimodal LLMs the LLaVA / BLIP-2 way.

Importing the package registers `model_type="mllm"` with transformers' Auto classes, so
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` work.
The registration is deferred until transformers loads its Auto classes, so `import mllm` (and the
`mllm` command's ``--help``) does not import torch; the model classes load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mllm.lazy import lazy_attributes
from mllm.models import register_auto_classes_on_import

if TYPE_CHECKING:
    from mllm.models import MllmConfig, MllmForConditionalGeneration, MllmProcessor

__all__ = ["MllmConfig", "MllmForConditionalGeneration", "MllmProcessor", "__version__"]
__version__ = "0.1.0"


__getattr__ = lazy_attributes(
    __name__,
    {name: "mllm.models" for name in ("MllmConfig", "MllmForConditionalGeneration", "MllmProcessor")},
)


register_auto_classes_on_import()
