"""Build a model from components, and load any `mllm train` output dir (full weights or adapter + trained)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mllm.models.configuration_mllm import MllmConfig
from mllm.models.connectors import build_connector
from mllm.models.modeling_mllm import MllmForConditionalGeneration, load_config_or_explain
from mllm.models.processing_mllm import MllmProcessor, ensure_image_token
from mllm.models.vision import vision_config_from

__all__ = ["build_model", "config_kwargs_of", "is_adapter_output_dir", "load_model_and_processor"]

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


def build_model(
    vision: str | os.PathLike,
    llm: str | os.PathLike,
    *,
    quantization_config: BitsAndBytesConfig | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    **config_kwargs,
) -> MllmForConditionalGeneration:
    """`MllmForConditionalGeneration.from_components`, plus a 4-bit LLM when ``quantization_config`` is given.

    Only the LLM is quantised; the vision tower and the connector load in ``dtype``.
    """
    if quantization_config is None:
        return MllmForConditionalGeneration.from_components(
            vision, llm, dtype=dtype, attn_implementation=attn_implementation, **config_kwargs
        )
    # Hand-written twin of from_components for the quantised LLM: from_components takes no
    # quantization_config, and loading the LLM twice (once in 16 bit) would defeat QLoRA's purpose.
    connector = config_kwargs.pop("connector", "mlp")
    image_token = config_kwargs.pop("image_token", "<image>")
    vision_config = load_config_or_explain("vision tower", vision, vision_config_from)
    text_config = load_config_or_explain("LLM", llm)
    tokenizer = load_config_or_explain("LLM tokenizer", llm, AutoTokenizer.from_pretrained)
    image_token_id = ensure_image_token(tokenizer, image_token)
    config = MllmConfig(
        vision_config=vision_config,
        text_config=text_config,
        connector_type=connector,
        image_token=image_token,
        image_token_id=image_token_id,
        **config_kwargs,
    )
    load_kw: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        load_kw["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = MllmForConditionalGeneration(config)
    tower_cls = MODEL_MAPPING[type(vision_config)]
    model.vision_tower = tower_cls.from_pretrained(str(vision), config=vision_config, **load_kw)
    model.language_model = AutoModelForCausalLM.from_pretrained(
        str(llm), quantization_config=quantization_config, **load_kw
    )
    model.connector = build_connector(config).to(dtype or torch.float32)
    if len(tokenizer) > model.language_model.get_input_embeddings().num_embeddings:
        model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.text_config = model.language_model.config
    model.config.vision_config = model.vision_tower.config
    model.generation_config = copy.deepcopy(model.language_model.generation_config)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.generation_config.suppress_tokens = [image_token_id]
    return model


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
        model = build_model(
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
