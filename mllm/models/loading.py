"""Load any `mllm train` run dir (full weights, or trained weights + adapter) with its processor."""

from __future__ import annotations

import os

import torch
from torch import nn

from mllm import run_dir
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor

__all__ = ["is_adapter_output_dir", "load_model_and_processor"]


def is_adapter_output_dir(path: str | os.PathLike) -> bool:
    """True for a run dir that plain `from_pretrained` cannot read alone (format ``trained``)."""
    return run_dir.needs_components(path)


def load_model_and_processor(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    merge_lora: bool = False,
    device: str | torch.device | None = None,
    quantize: bool | None = None,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, MllmProcessor]:
    """Load an `mllm train` run dir (final or ``checkpoint-N``) and its processor, in eval mode.

    The model is `MllmForConditionalGeneration.from_run_dir` (a `peft.PeftModel` when the run dir
    carries a LoRA adapter and ``merge_lora`` is False); the processor is the one saved beside it,
    whose image-token count is the model config's.
    """
    run_dir.read_record(path)  # a clear error before anything loads when `path` is not a run dir
    processor = MllmProcessor.from_pretrained(str(path))
    model = MllmForConditionalGeneration.from_run_dir(
        path, dtype=dtype, merge_lora=merge_lora, quantize=quantize, attn_implementation=attn_implementation
    )
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    if processor.num_image_tokens != config.num_image_tokens:
        raise run_dir.CorruptRunDirError(
            f"`{path}`: the processor expands <image> into {processor.num_image_tokens} tokens but the model "
            f"config says {config.num_image_tokens}."
        )
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor
