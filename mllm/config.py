"""Typed run configuration: recipe YAML + ``key=value`` overrides -> dataclasses.

A recipe is a flat mapping of argument names. Names that `transformers.TrainingArguments` already
has (``learning_rate``, ``per_device_train_batch_size``, ``deepspeed``, ...) go there; the rest
belong to `ModelArguments`, `TuningArguments` or `DataArguments`. An unknown key, a value of the
wrong type or an unknown choice fails here, before any model is loaded, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import TrainingArguments

__all__ = [
    "ModelArguments",
    "TuningArguments",
    "DataArguments",
    "RunConfig",
    "ConfigError",
    "parse_overrides",
    "load_recipe",
    "build_run_config",
]

TuneMode = Literal["frozen", "full", "lora", "qlora"]


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid configuration."""


@dataclass
class ModelArguments:
    vision_tower: str = ""  # vision tower: Hub id or local folder (CLIP, SigLIP)
    model_name_or_path: str = ""  # the causal LLM: Hub id or local folder (Llama, Qwen2, GPT-2, ...)
    connector_type: str = "mlp"  # linear | mlp | qformer
    connector_depth: int = 2  # Linear layers in the mlp connector (LLaVA-1.5 mlp2x_gelu = 2)
    num_query_tokens: int = 32  # Q-Former queries = image tokens per image (qformer only)
    vision_feature_layer: int = -2  # vision hidden state fed to the connector
    vision_feature_select_strategy: Literal["default", "full"] = "default"  # default drops CLS
    image_token: str = "<image>"  # placeholder string in prompts
    attn_implementation: str | None = None  # sdpa | eager | flash_attention_2; None = transformers' default
    init_from: str | None = None  # a previous stage's output dir to start from (null = the components)


@dataclass
class TuningArguments:
    tune_vision: Literal["frozen", "full", "lora"] = "frozen"  # vision tower
    tune_connector: Literal["frozen", "full"] = "full"  # connector
    tune_llm: TuneMode = "frozen"  # LLM: frozen | full | lora | qlora (4-bit NF4)
    lora_r: int = 128  # LoRA rank (LLaVA-1.5 LoRA recipe: 128)
    lora_alpha: int = 256  # LoRA alpha (LLaVA-1.5 LoRA recipe: 256)
    lora_dropout: float = 0.05  # dropout on the LoRA path
    lora_target_modules: list[str] | None = (
        None  # None = every linear layer of the LLM (never the vision tower)
    )
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    connector_lr: float | None = None  # learning rate of the connector (None = learning_rate)
    vision_lr: float | None = None  # learning rate of the vision tower (None = learning_rate)
    bnb_4bit_compute_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"  # QLoRA compute dtype
    bnb_4bit_double_quant: bool = True  # QLoRA double quantisation


@dataclass
class DataArguments:
    data_path: str = ""  # LLaVA json/jsonl, messages json/jsonl, HF dataset folder or parquet
    image_folder: str | None = None  # root that relative image paths resolve against
    eval_data_path: str | None = None  # optional evaluation split, same formats
    model_max_length: int = 2048  # tokens per sample, image tokens included
    template: str | None = None  # chat template name; None = the tokenizer's own chat template
    bad_data: Literal["skip", "strict"] = "skip"  # skip and count bad records, or stop at the first
    truncation: Literal["drop", "cut_text"] = (
        "drop"  # a sample too long: drop it, or cut text after its images
    )
    packing: bool = False  # pack several samples into one row (attention kept within samples)
    group_by_modality_length: bool = True  # length-grouped batches, image and text-only apart


@dataclass
class RunConfig:
    model: ModelArguments
    tuning: TuningArguments
    data: DataArguments
    training: TrainingArguments
    source: dict[str, Any] = field(default_factory=dict)  # the merged flat mapping, for the run's record


_OURS = (ModelArguments, TuningArguments, DataArguments)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["learning_rate=1e-3", "tune_llm=lora"]`` -> typed values (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override `{item}` is not of the form key=value.")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe `{path}` does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe `{path}` is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe `{path}` must be a flat mapping of argument names, got {type(data).__name__}."
        )
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(
            f"recipe `{path}`: keys {nested} hold mappings; a recipe is flat (argument: value)."
        )
    return data


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` to ``hint`` where that is unambiguous; raise ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}.")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"`{key}` got {value!r}, which fits none of {hint}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` must be a list, got {value!r}.")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [_check_value(key, v, item_hint) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict) and not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a mapping, got {value!r}.")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"`{key}` must be a number, got {value!r}.")
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"`{key}` must be a string, got {value!r}.")
        return str(value)
    return value  # enums and library-specific types: TrainingArguments validates them itself


def _validate_choices(model: ModelArguments, data: DataArguments) -> None:
    from mllm.models.connectors import CONNECTORS

    if model.connector_type not in CONNECTORS:
        raise ConfigError(
            f"`connector_type` is `{model.connector_type}`; choose one of: {', '.join(CONNECTORS.names())}."
        )
    if model.connector_depth < 1:
        raise ConfigError(f"`connector_depth` must be >= 1, got {model.connector_depth}.")
    if data.model_max_length < 1:
        raise ConfigError(f"`model_max_length` must be >= 1, got {data.model_max_length}.")
    if not model.vision_tower and not model.init_from:
        raise ConfigError(
            "`vision_tower` is required (a Hub id or a local folder) unless `init_from` is set."
        )
    if not model.model_name_or_path and not model.init_from:
        raise ConfigError("`model_name_or_path` (the LLM) is required unless `init_from` is set.")
    if data.template is not None:
        from mllm.data.templates import TEMPLATES

        if data.template not in TEMPLATES:
            raise ConfigError(
                f"`template` is `{data.template}`; choose one of: {', '.join(TEMPLATES.names())}."
            )


def build_run_config(recipe: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Merge a recipe and ``key=value`` overrides into typed dataclasses, failing on the first bad key."""
    flat = load_recipe(recipe) if recipe is not None else {}
    flat.update(parse_overrides(overrides or []))
    ours_types = {cls: _field_types(cls) for cls in _OURS}
    hf_types = _field_types(TrainingArguments)
    known = {name for types_ in ours_types.values() for name in types_} | set(hf_types)
    buckets: dict[type, dict[str, Any]] = {cls: {} for cls in (*_OURS, TrainingArguments)}
    for key, value in flat.items():
        owner = next((cls for cls, types_ in ours_types.items() if key in types_), None)
        if owner is None and key in hf_types:
            owner = TrainingArguments
        if owner is None:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown argument `{key}` in the recipe or overrides.{hint}")
        hint_type = ours_types[owner][key] if owner in ours_types else hf_types[key]
        buckets[owner][key] = _check_value(key, value, hint_type)
    model = ModelArguments(**buckets[ModelArguments])
    tuning = TuningArguments(**buckets[TuningArguments])
    data = DataArguments(**buckets[DataArguments])
    _validate_choices(model, data)
    defaults = {
        "output_dir": "runs/default",
        "report_to": "none",
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns
    }
    training_kwargs = {**defaults, **buckets[TrainingArguments]}
    try:
        training = TrainingArguments(**training_kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid training arguments: {err}") from err
    return RunConfig(model=model, tuning=tuning, data=data, training=training, source=flat)
