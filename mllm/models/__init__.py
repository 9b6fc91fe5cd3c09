"""The composed model, its config and processor."""

from __future__ import annotations

from mllm.models.configuration_mllm import MllmConfig
from mllm.models.modeling_mllm import MllmForConditionalGeneration, MllmPreTrainedModel
from mllm.models.processing_mllm import MllmProcessor

__all__ = [
    "MllmConfig",
    "MllmForConditionalGeneration",
    "MllmPreTrainedModel",
    "MllmProcessor",
    "register_auto_classes",
]


def register_auto_classes() -> None:
    """Make `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` know `model_type="mllm"`.

    Idempotent: safe to call more than once.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "mllm" in CONFIG_MAPPING:
        return
    AutoConfig.register("mllm", MllmConfig)
    AutoModelForImageTextToText.register(MllmConfig, MllmForConditionalGeneration)
    AutoProcessor.register(MllmConfig, MllmProcessor)
