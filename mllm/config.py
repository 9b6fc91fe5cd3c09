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

import yaml

if typing.TYPE_CHECKING:
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
    "DEEPSPEED_CONFIGS",
    "resolve_deepspeed",
    "shipped_recipes_dir",
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
    # BLIP-2 stage 1 (mllm.training.qformer_stage): the Q-Former alone, no LLM; later stages inherit its size.
    # The size keys also shape a randomly initialised `connector_type: qformer` (a run without init_from).
    qformer_pretrain: bool = False  # train the Q-Former with ITC + ITM + ITG on image-text pairs
    qformer_num_layers: int = 2  # Q-Former layers (BLIP-2: 12, from BERT-base)
    qformer_hidden_size: int | None = None  # Q-Former width; None = the vision tower's (BLIP-2: 768)
    qformer_num_heads: int | None = None  # attention heads; None = the vision tower's (BLIP-2: 12)
    qformer_cross_attention_freq: int = 1  # a cross-attention layer every N layers (BLIP-2: 2)
    # learned position embeddings on the vision features the queries cross-attend (BLIP-2: none, its ViT's
    # features carry position; needed when a tower's do not, as the tiny one's; mllm.models.connectors.vision_positions)
    qformer_vision_positions: bool = False
    qformer_embed_dim: int = 256  # ITC projection width (BLIP-2: 256)
    qformer_tokenizer: str | None = None  # tokenizer of the Q-Former's text; None = model_name_or_path's
    qformer_max_text_length: int = 32  # caption tokens, [CLS] included (BLIP-2: 32)
    contrastive_loss: Literal["infonce", "sigmoid"] = "infonce"  # ITC: CLIP InfoNCE or SigLIP sigmoid
    qformer_text_init: str | None = (
        None  # BERT-family checkpoint for the Q-Former (its size too); None = random
    )


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
    template: str | None = None  # chat template name; None (or auto) = the tokenizer's own chat template
    bad_data: Literal["skip", "strict"] = "skip"  # skip and count bad records, or stop at the first
    truncation: Literal["drop", "cut_text"] = (
        "drop"  # a sample too long: drop it, or cut text after its images
    )
    packing: bool = False  # pack several samples into one row (attention kept within samples)
    packing_max_length: int | None = (
        None  # tokens per packed row, image tokens counted; None = model_max_length
    )
    vision_feature_cache: str | None = (
        None  # frozen-tower features folder (mllm cache-features); None = run the tower
    )
    vision_feature_cache_dtype: Literal["float16", "bfloat16", "float32"] = (
        "float16"  # cached features' dtype
    )
    group_by_modality_length: bool = True  # length-grouped batches, image and text-only apart
    allow_symlinks: bool = False  # follow symlinks in image_folder that point outside it (refused by default)


@dataclass
class RunConfig:
    model: ModelArguments
    tuning: TuningArguments
    data: DataArguments
    training: TrainingArguments
    source: dict[str, Any] = field(default_factory=dict)  # the merged flat mapping, for the run's record


_OURS = (ModelArguments, TuningArguments, DataArguments)


class YamlWord(str):
    """A YAML 1.1 boolean word (``no``, ``yes``, ``on``, ``off``, ``true``, ``false``) as written.

    The field it is given to decides: a ``bool`` field reads it as the boolean, a string or choice
    field as the word itself (``save_strategy: no`` is the string ``"no"``, not ``False``).
    """

    @property
    def as_bool(self) -> bool:
        return self.lower() in ("yes", "y", "true", "on")


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that keeps boolean words as `YamlWord` until the field's type is known."""


def _construct_word(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> YamlWord:
    return YamlWord(loader.construct_scalar(node))


_RecipeLoader.add_constructor("tag:yaml.org,2002:bool", _construct_word)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def plain(value: Any) -> Any:
    """``value`` with every `YamlWord` turned into the boolean it spells (lists included)."""
    if isinstance(value, YamlWord):
        return value.as_bool
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["learning_rate=1e-3", "tune_llm=lora"]`` -> values read as YAML scalars (boolean words kept
    as written until the field's type decides, see `YamlWord`)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override `{item}` is not of the form key=value.")
        try:
            out[key.strip()] = _load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override `{item}`: the value is not a YAML scalar: {err}") from err
    return out


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The flat mapping of a recipe YAML, values as `plain` YAML (``no`` is False here; only
    `build_run_config` reads a boolean word as the string a string field needs)."""
    return {k: plain(v) for k, v in _read_recipe(path).items()}


def _read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe `{path}` does not exist.")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe `{path}` is not UTF-8 text (byte {err.start}).") from err
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


# `deepspeed: NAME` -> the DeepSpeed JSON shipped in recipes/deepspeed/.
DEEPSPEED_CONFIGS = ("zero2", "zero3", "zero3_offload")


def shipped_recipes_dir() -> Path:
    """The recipes that ship with mllm: the repository's ``recipes/`` (a checkout or an editable
    install), else the copy a wheel installs under ``<prefix>/share/mllm/recipes`` (setup.cfg
    ``data_files``)."""
    import sysconfig

    beside = Path(__file__).resolve().parent.parent / "recipes"
    if (beside / "deepspeed").is_dir():
        return beside
    return Path(sysconfig.get_path("data")) / "share" / "mllm" / "recipes"


def resolve_deepspeed(value: str, recipe_dir: Path | None = None) -> str:
    """``zero2`` / ``zero3`` / ``zero3_offload`` -> the shipped JSON; a relative path -> the file
    relative to the current directory, else relative to the recipe's folder (``recipe_dir``), else
    inside the shipped recipes (``recipes/deepspeed/zero3.json`` works from any directory)."""
    if value in DEEPSPEED_CONFIGS:
        return str(shipped_recipes_dir() / "deepspeed" / f"{value}.json")
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    candidates = []
    if recipe_dir is not None:
        candidates.append(recipe_dir / path)
    shipped = shipped_recipes_dir()
    if path.parts and path.parts[0] == "recipes":
        candidates.append(shipped.joinpath(*path.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(
        f"`deepspeed` is `{value}`: no such file (looked in the current directory"
        + (f", beside the recipe in {recipe_dir}" if recipe_dir is not None else "")
        + f"); name a shipped config ({', '.join(DEEPSPEED_CONFIGS)}) or a JSON file."
    )


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` to ``hint`` where that is unambiguous; raise ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(hint)
    if isinstance(value, YamlWord):
        return _check_word(key, value, hint)
    if (
        isinstance(value, list)
        and any(isinstance(v, YamlWord) for v in value)
        and origin not in (list, tuple)
    ):
        value = plain(value)
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
        if isinstance(value, bool) and bool in args:
            return value
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


def _admits_str(hint: Any) -> bool:
    """Whether a field of type ``hint`` takes a string (str, a Literal of strings, a str enum)."""
    if hint is str:
        return True
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(isinstance(c, str) for c in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_admits_str(a) for a in typing.get_args(hint))
    return isinstance(hint, type) and issubclass(hint, str)


def _admits_bool(hint: Any) -> bool:
    if hint is bool or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(isinstance(c, bool) for c in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_admits_bool(a) for a in typing.get_args(hint))
    return False


def _check_word(key: str, word: YamlWord, hint: Any) -> Any:
    """A YAML boolean word: the boolean for a field that takes one, else the word as written."""
    if _admits_bool(hint) or not _admits_str(hint):
        return _check_value(key, word.as_bool, hint)
    return _check_value(key, str(word), hint)


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
    """Merge a recipe and ``key=value`` overrides into typed dataclasses, failing on the first bad key.

    ``source`` (the run's record of its configuration) holds the values as read: boolean words
    resolved by the field's type, ``deepspeed`` as given (a shipped name or the path written).
    """
    from transformers import TrainingArguments

    flat = _read_recipe(recipe) if recipe is not None else {}
    from_overrides = parse_overrides(overrides or [])
    flat.update(from_overrides)
    ours_types = {cls: _field_types(cls) for cls in _OURS}
    hf_types = _field_types(TrainingArguments)
    hf_types["resume_from_checkpoint"] = str | bool | None  # Trainer.train: True = last checkpoint
    known = {name for types_ in ours_types.values() for name in types_} | set(hf_types)
    buckets: dict[type, dict[str, Any]] = {cls: {} for cls in (*_OURS, TrainingArguments)}
    source: dict[str, Any] = {}
    for key, value in flat.items():
        owner = next((cls for cls, types_ in ours_types.items() if key in types_), None)
        if owner is None and key in hf_types:
            owner = TrainingArguments
        if owner is None:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown argument `{key}` in the recipe or overrides.{hint}")
        hint_type = ours_types[owner][key] if owner in ours_types else hf_types[key]
        checked = _check_value(key, value, hint_type)
        source[key] = checked if _has_word(value) else value
        buckets[owner][key] = checked
    hf = buckets[TrainingArguments]
    if hf.get("resume_from_checkpoint") is False:
        hf["resume_from_checkpoint"] = None
    if isinstance(hf.get("deepspeed"), str):
        recipe_dir = None if recipe is None or "deepspeed" in from_overrides else Path(recipe).parent
        hf["deepspeed"] = resolve_deepspeed(hf["deepspeed"], recipe_dir)
    model = ModelArguments(**buckets[ModelArguments])
    tuning = TuningArguments(**buckets[TuningArguments])
    data = DataArguments(**buckets[DataArguments])
    _validate_choices(model, data)
    defaults = {
        "output_dir": "runs/default",
        "report_to": "none",
        "dataloader_pin_memory": _cuda_available(),  # pinning without a GPU only warns
    }
    training_kwargs = {**defaults, **hf}
    try:
        training = TrainingArguments(**training_kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid training arguments: {err}") from err
    return RunConfig(model=model, tuning=tuning, data=data, training=training, source=source)


def _has_word(value: Any) -> bool:
    return isinstance(value, YamlWord) or (
        isinstance(value, list) and any(isinstance(v, YamlWord) for v in value)
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
