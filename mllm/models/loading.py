"""Build a model from components, and load any `mllm train` output dir (full weights or adapter + trained)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig

from mllm.models.configuration_mllm import MllmConfig
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor

__all__ = ["config_kwargs_of", "is_adapter_output_dir", "load_model_and_processor"]

_CONFIG_FIELDS = (
    "connector_depth",
    "connector_hidden_act",
    "num_query_tokens",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "qformer_config",
)


def config_kwargs_of(config: MllmConfig) -> dict[str, Any]:
    """The `from_components` arguments that rebuild ``config``'s architecture."""
    kwargs = {name: getattr(config, name) for name in _CONFIG_FIELDS}
    kwargs.update(connector=config.connector_type, image_token=config.image_token)
    return kwargs


def is_adapter_output_dir(path: str | os.PathLike) -> bool:
    """True for an output dir that plain `from_pretrained` cannot read alone (format (b): trained + adapter)."""
    from mllm.training.checkpoint import ADAPTER_CONFIG, RUN_RECORD, TRAINED_WEIGHTS

    path = Path(path)
    return (path / RUN_RECORD).is_file() and (
        (path / TRAINED_WEIGHTS).is_file() or (path / ADAPTER_CONFIG).is_file()
    )


def load_model_and_processor(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    merge_lora: bool = False,
    device: str | torch.device | None = None,
    quantize: bool | None = None,
) -> tuple[nn.Module, MllmProcessor]:
    """Load an `mllm train` output dir (final or ``checkpoint-N``) and its processor.

    Full weights load with `from_pretrained`. Otherwise the model is rebuilt from the recorded
    components, ``trained.safetensors`` is loaded and the LoRA adapter attached (a `peft.PeftModel`),
    or folded in when ``merge_lora`` (a plain `MllmForConditionalGeneration`). ``quantize`` (default:
    as trained, unless merging) loads the LLM of a QLoRA run in 4 bit. Nothing is frozen here beyond
    what peft itself does to an attached adapter's base.
    """
    from mllm.config import TuningArguments
    from mllm.models.adapters import llm_quantization_config
    from mllm.training.checkpoint import ADAPTER_CONFIG, load_weights_into, read_run_record

    path = Path(path)
    record = read_run_record(path)
    processor = MllmProcessor.from_pretrained(str(path))
    if record["format"] == "full":
        model = MllmForConditionalGeneration.from_pretrained(str(path), dtype=dtype, _mllm_plain=True)
    else:
        config = AutoConfig.from_pretrained(str(path))
        tuning = TuningArguments(**record["tuning"])
        if quantize is None:
            quantize = tuning.tune_llm == "qlora" and not merge_lora
        quantization = llm_quantization_config(tuning) if quantize else None
        if quantize and quantization is None:
            quantization = llm_quantization_config(TuningArguments(tune_llm="qlora"))
        model = MllmForConditionalGeneration.from_components(
            record["vision_tower"],
            record["model_name_or_path"],
            quantization_config=quantization,
            dtype=dtype,
            **config_kwargs_of(config),
        )
        if (path / ADAPTER_CONFIG).is_file():
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        load_weights_into(model, path)
        if merge_lora and isinstance(model, PeftModel):
            model = model.merge_and_unload()
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor
