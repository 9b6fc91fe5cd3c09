"""Liger kernels (``use_liger_kernel``) on the LLM inside an mllm model.

transformers' Trainer patches ``self.model`` with `liger_kernel.transformers._apply_liger_kernel_to_instance`,
which picks the kernels by ``config.model_type``: on an `MllmForConditionalGeneration` (model type
``mllm``) it finds none and patches nothing. The kernels belong to the LLM (RMSNorm, RoPE,
SwiGLU, and the fused linear + cross-entropy loss that never materialises the [B, T, vocab]
logits), so mllm applies them to ``language_model``, whose model type Liger knows (llama, qwen2,
mistral, ...). The tower and the connector are left as they are.

Liger's kernels are Triton GPU kernels; `mllm.training.preflight` refuses ``use_liger_kernel`` on
the CPU or without the package (the ``liger`` extra) before any model loads.
See https://github.com/linkedin/Liger-Kernel (``monkey_patch.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["apply_liger_to_llm"]

logger = logging.getLogger(__name__)


def apply_liger_to_llm(model: nn.Module, kernel_config: Mapping[str, Any] | None = None) -> nn.Module:
    """Patch the LLM of ``model`` (an `MllmForConditionalGeneration`, maybe inside peft) in place with
    Liger's kernels for its model type; ``kernel_config`` is TrainingArguments' ``liger_kernel_config``
    (``rope``, ``swiglu``, ``rms_norm``, ``fused_linear_cross_entropy``, ...). Returns the LLM."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from mllm.models.adapters import unwrap_mllm

    llm = unwrap_mllm(model).language_model
    _apply_liger_kernel_to_instance(model=llm, **dict(kernel_config or {}))
    logger.info("Liger kernels applied to the LLM (%s)", llm.config.model_type)
    return llm
