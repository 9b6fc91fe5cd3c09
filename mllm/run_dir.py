"""The run directory: what `mllm train` writes at every save (``checkpoint-N``) and at the end.

A run dir holds ``config.json`` (MllmConfig) + processor files + ``mllm_run.json`` (the `RunRecord`)
+ weights in one of two formats, decided by `RunRecord.format`:

(a) ``full`` — ``model.safetensors``, all weights, when the LLM differs from its component (fully
    tuned, or a LoRA merged in by `mllm merge` or by a later stage's ``init_from``);
(b) ``trained`` — ``trained.safetensors`` holds only what differs from the recorded components: the
    connector, the vision tower if it was tuned fully, and the embedding rows of tokens added to the
    LLM vocabulary (``<image>``: their random init is not reproducible) — plus, with LoRA / QLoRA,
    peft's ``adapter_config.json`` + ``adapter_model.safetensors``.

A final output dir also holds ``checkpoint-N`` folders (each a run dir plus the Trainer's optimizer,
scheduler, RNG and ``trainer_state.json``), ``skipped_records.json`` and ``trainer_state.json``.

This module is files and a record (torch / peft / safetensors, no mllm model code), so that the
model classes can read a run dir without importing upwards; building a model from a run dir is
`MllmForConditionalGeneration.from_run_dir` and `mllm.models.loading.load_model_and_processor`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.io import PARTIAL, atomic_write_json, give_ordinary_permissions, remove_partials

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CHECKPOINT_PREFIX",
    "FULL_WEIGHTS",
    "RUN_RECORD",
    "TRAINED_WEIGHTS",
    "CorruptRunDirError",
    "NotAnOutputDirError",
    "RunRecord",
    "check_weight_files",
    "checkpoints",
    "has_adapter",
    "is_run_dir",
    "is_secret_key",
    "last_checkpoint",
    "load_weights_into",
    "mask_secrets",
    "needs_components",
    "read_record",
    "resolve_resume",
    "save_run_dir",
]

logger = logging.getLogger(__name__)

RUN_RECORD = "mllm_run.json"
TRAINED_WEIGHTS = "trained.safetensors"
FULL_WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR: `checkpoint-N`
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_ROWS = "__added_rows__."  # key prefix in trained.safetensors for rows of tokens added to the vocabulary
_PEFT_PREFIX = "base_model.model."
_LORA_MODES = ("lora", "qlora")

# Keys whose values are secrets: transformers' rule (`TrainingArguments.to_dict` masks every key
# ending in `_token`, e.g. `hub_token`), plus a bare `token` and the usual names of credentials;
# less the mllm settings that only look like one (`image_token` is the placeholder string).
NOT_SECRET_KEYS = frozenset({"image_token"})
_SECRET_WORDS = ("password", "secret", "api_key", "apikey", "credential")

Format = Literal["full", "trained"]


class NotAnOutputDirError(ValueError):
    """A path that is not an mllm run directory."""


class CorruptRunDirError(ValueError):
    """A run-dir file that exists but cannot be read (a killed copy, a truncated download, ...)."""


def is_secret_key(key: str) -> bool:
    """True for a setting whose value must never be written to disk (``hub_token``, ``*_token``, ...)."""
    key = key.lower()
    if key in NOT_SECRET_KEYS:
        return False
    return key == "token" or key.endswith("_token") or any(word in key for word in _SECRET_WORDS)


def mask_secrets(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` with each secret's value replaced by ``<KEY>``, as transformers writes them."""
    return {k: f"<{k.upper()}>" if is_secret_key(k) and v is not None else v for k, v in mapping.items()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class RunRecord:
    """``mllm_run.json``: where a run's weights come from and what it changed. The format rules live here.

    Build one with `RunRecord.new` (from components) or `continued` (``init_from``); `merged` and
    `interrupted_at` derive the records of a merged or stopped run. Loads the JSON of every version.
    """

    vision_tower: str  # the vision tower's Hub id or folder the run started from
    model_name_or_path: str  # the LLM's Hub id or folder
    tuning: Mapping[str, Any]  # the run's TuningArguments as a dict (tune_vision, tune_llm, lora_r, ...)
    base_vocab_size: int  # the LLM's vocabulary size before <image> was added
    modified: frozenset[str]  # components whose weights differ from the recorded ones
    config: Mapping[str, Any] = field(default_factory=dict)  # the run's flat recipe mapping, secrets masked
    merged_from: str | None = None  # the run dir whose LoRA `mllm merge` folded in
    interrupted: Mapping[str, Any] | None = None  # {"signal": "SIGTERM", "step": N} when stopped early
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept on save

    def __post_init__(self) -> None:
        object.__setattr__(self, "modified", frozenset(self.modified))
        object.__setattr__(self, "tuning", dict(self.tuning))
        object.__setattr__(self, "config", _jsonable(mask_secrets(self.config)))

    # -- the rules ------------------------------------------------------------------------------
    @classmethod
    def new(
        cls,
        *,
        vision_tower: str,
        model_name_or_path: str,
        tuning: Mapping[str, Any],
        base_vocab_size: int,
        config: Mapping[str, Any] | None = None,
        inherited_modified: Iterable[str] = (),
    ) -> RunRecord:
        """A run's record: the connector always differs from the components, a fully tuned component too."""
        modified = {"connector", *inherited_modified}
        if tuning["tune_vision"] == "full":
            modified.add("vision_tower")
        if tuning["tune_llm"] == "full":
            modified.add("language_model")
        return cls(
            vision_tower=str(vision_tower),
            model_name_or_path=str(model_name_or_path),
            tuning=tuning,
            base_vocab_size=int(base_vocab_size),
            modified=frozenset(modified),
            config=dict(config or {}),
        )

    @property
    def format(self) -> Format:
        """``full`` when the LLM's weights differ from the component (they are then all saved), else ``trained``."""
        return "full" if "language_model" in self.modified else "trained"

    @property
    def lora_components(self) -> frozenset[str]:
        """The components this run adapted with LoRA (merged or not)."""
        out = set()
        if self.tuning.get("tune_llm") in _LORA_MODES:
            out.add("language_model")
        if self.tuning.get("tune_vision") == "lora":
            out.add("vision_tower")
        return frozenset(out)

    @property
    def modified_after_merge(self) -> frozenset[str]:
        """A merged LoRA changes its component's weights: LoRA on the LLM merged => format ``full``."""
        return self.modified | self.lora_components

    def continued(self, *, tuning: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> RunRecord:
        """The record of a later stage that starts from this run (``init_from``, its LoRA merged)."""
        return RunRecord.new(
            vision_tower=self.vision_tower,
            model_name_or_path=self.model_name_or_path,
            tuning=tuning,
            base_vocab_size=self.base_vocab_size,
            config=config,
            inherited_modified=self.modified_after_merge,
        )

    def merged(self, source: str | os.PathLike[str]) -> RunRecord:
        """The record of this run with its LoRA folded into the weights (`mllm merge`)."""
        return dataclasses.replace(self, modified=self.modified_after_merge, merged_from=str(source))

    def interrupted_at(self, signal_name: str, step: int) -> RunRecord:
        """This record marked as stopped early by ``signal_name`` after ``step`` optimizer steps."""
        return dataclasses.replace(self, interrupted={"signal": signal_name, "step": int(step)})

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "vision_tower": self.vision_tower,
            "model_name_or_path": self.model_name_or_path,
            "tuning": _jsonable(self.tuning),
            "modified": sorted(self.modified),
            "base_vocab_size": self.base_vocab_size,
            "format": self.format,
            "config": dict(self.config),
        }
        if self.merged_from is not None:
            out["merged_from"] = self.merged_from
        if self.interrupted is not None:
            out["interrupted"] = dict(self.interrupted)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str | os.PathLike[str] = RUN_RECORD) -> RunRecord:
        required = ("vision_tower", "model_name_or_path", "tuning", "base_vocab_size", "modified")
        missing = [k for k in required if k not in data]
        if missing:
            raise CorruptRunDirError(f"`{source}` lacks {missing}: it is not a run record written by mllm.")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        record = cls(
            **{k: data[k] for k in known if k in data},
            extra={k: v for k, v in data.items() if k not in known and k != "format"},
        )
        if data.get("format", record.format) != record.format:
            raise CorruptRunDirError(
                f"`{source}` says format {data['format']!r} but its modified components {sorted(record.modified)} "
                f"mean {record.format!r}."
            )
        return record

    @classmethod
    def coerce(cls, record: RunRecord | Mapping[str, Any]) -> RunRecord:
        """A `RunRecord` from itself or from the ``mllm_run.json`` dict of earlier code."""
        return record if isinstance(record, RunRecord) else cls.from_json(record)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / RUN_RECORD
        atomic_write_json(path, self.to_json())
        return path


# -- what a folder is ---------------------------------------------------------------------------
def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder with ``config.json`` and ``mllm_run.json`` (a final output dir or ``checkpoint-N``)."""
    path = Path(path)
    return (path / RUN_RECORD).is_file() and (path / "config.json").is_file()


def read_record(path: str | os.PathLike[str]) -> RunRecord:
    """The `RunRecord` of run dir ``path``; an error naming ``path`` (or the broken file) otherwise."""
    path = Path(path)
    if not path.is_dir() or not is_run_dir(path):
        raise NotAnOutputDirError(
            f"`{path}` is not an mllm output directory: expected config.json and {RUN_RECORD} "
            "(written by `mllm train`) in it."
        )
    file = path / RUN_RECORD
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptRunDirError(f"`{file}` is corrupt ({err}); the run dir cannot be read.") from err
    if not isinstance(data, dict):
        raise CorruptRunDirError(f"`{file}` holds {type(data).__name__}, not a run record.")
    return RunRecord.from_json(data, file)


def has_adapter(path: str | os.PathLike[str]) -> bool:
    """True when the run dir carries a peft LoRA adapter (format ``trained`` with LoRA, not merged)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def needs_components(path: str | os.PathLike[str]) -> bool:
    """True for a run dir that plain `from_pretrained` cannot read alone (format ``trained``)."""
    path = Path(path)
    return is_run_dir(path) and read_record(path).format == "trained"


def warn_if_interrupted(path: str | os.PathLike[str], record: RunRecord) -> None:
    if record.interrupted is not None:
        logger.warning(
            "`%s` is the output of a run stopped early by %s after %s steps: it is not the end of the recipe.",
            path,
            record.interrupted.get("signal"),
            record.interrupted.get("step"),
        )


def checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete ``checkpoint-N`` run dirs in ``output_dir``, oldest (lowest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for item in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(item.name)
        if match and item.is_dir() and is_run_dir(item):
            found.append((int(match.group(1)), item))
    return [path for _, path in sorted(found)]


def last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike[str]) -> str | None:
    """``resume_from_checkpoint`` as a checkpoint path: True (or "true") = the last one in ``output_dir``,
    as in transformers; a path must be a complete checkpoint. None / False / "" = start afresh."""
    if value is None or value is False or value == "":
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        last = last_checkpoint(output_dir)
        if last is None:
            raise NotAnOutputDirError(
                f"resume_from_checkpoint=true but `{output_dir}` holds no complete {CHECKPOINT_PREFIX}-N "
                "folder to resume from."
            )
        return str(last)
    path = Path(value)
    if not is_run_dir(path) or not (path / TRAINER_STATE).is_file():
        raise NotAnOutputDirError(
            f"resume_from_checkpoint `{path}` is not a complete checkpoint: expected config.json, {RUN_RECORD} "
            f"and {TRAINER_STATE} in it."
        )
    return str(path)


# -- writing ------------------------------------------------------------------------------------
def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel  # imported when used: peft pulls in bitsandbytes, which warns at import

    return isinstance(model, PeftModel)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft(model) else model


def _base_key(key: str) -> str:
    return key.removeprefix(_PEFT_PREFIX)


def _is_lora_key(key: str) -> bool:
    return ".lora_" in key or "lora_magnitude_vector" in key


def _param_name(module: nn.Module, param: torch.Tensor) -> str:
    return next(name for name, p in module.named_parameters(remove_duplicate=False) if p is param)


def _clean_config(config):
    config = copy.deepcopy(config)
    # The 4-bit load is a training choice recorded in mllm_run.json, not part of the architecture.
    for sub in (config, config.text_config):
        if hasattr(sub, "quantization_config"):
            delattr(sub, "quantization_config")
    return config


def save_run_dir(
    model: nn.Module,
    output_dir: str | os.PathLike[str],
    *,
    processor: Any,
    record: RunRecord | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (an MllmForConditionalGeneration, maybe inside a PeftModel) as a run dir.

    ``state_dict`` (keys of ``model``) replaces ``model.state_dict()`` — under DeepSpeed ZeRO-3 it is the
    gathered one. Files are written into a staging folder inside ``output_dir`` (which may already
    hold ``checkpoint-*`` folders) and moved into place one by one, the record last, so a crash never
    leaves a half-written weight file; staging left by an earlier killed save is removed first.
    """
    output_dir = Path(output_dir)
    record = RunRecord.coerce(record)
    base = _unwrap(model)
    if state_dict is None:
        state_dict = model.state_dict()
    sd = {_base_key(k): v for k, v in state_dict.items()}
    peft = _is_peft(model)
    if record.format == "full" and peft:
        raise ValueError("a full-weight output dir cannot also carry a LoRA adapter (merge it first).")
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_partials(output_dir):
        logger.info("removed `%s`, left by an interrupted save", stale)
    tmp = output_dir / f".save{PARTIAL}{os.getpid()}"
    tmp.mkdir()
    try:
        _clean_config(base.config).save_pretrained(tmp)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if record.format == "full":
            base.save_pretrained(tmp, state_dict={k: v for k, v in sd.items() if not _is_lora_key(k)})
        else:
            save_file(_trained_tensors(base, sd, record), tmp / TRAINED_WEIGHTS, metadata={"format": "pt"})
            if peft:
                model.save_pretrained(tmp, state_dict=dict(state_dict), save_embedding_layers=False)
        record.save(tmp)
        give_ordinary_permissions(tmp)  # safetensors writes 0600 files
        for stale in (FULL_WEIGHTS, TRAINED_WEIGHTS, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (tmp / stale).exists():
                (output_dir / stale).unlink(missing_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == RUN_RECORD):  # the record goes last
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _trained_tensors(base: nn.Module, sd: Mapping[str, torch.Tensor], record: RunRecord) -> dict:
    """connector + fully tuned vision tower + the rows of tokens added to the LLM vocabulary."""
    out = {
        k: v
        for k, v in sd.items()
        if k.split(".", 1)[0] in record.modified
        and k.split(".", 1)[0] != "language_model"
        and not _is_lora_key(k)
    }
    # peft wraps LoRA-targeted layers: `x.base_layer.weight` is the original `x.weight`.
    out = {k.replace(".base_layer.", "."): v for k, v in out.items()}
    n = record.base_vocab_size
    embeddings = base.get_input_embeddings().weight
    out[_ROWS + "input_embeddings"] = sd[_param_name(base, embeddings)][n:]
    head = base.get_output_embeddings()
    if head is not None and head.weight is not embeddings:
        out[_ROWS + "output_embeddings"] = sd[_param_name(base, head.weight)][n:]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


# -- reading weights ----------------------------------------------------------------------------
def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``file``; a `CorruptRunDirError` naming it when it cannot be read."""
    if not file.is_file():
        raise CorruptRunDirError(f"`{file}` is missing: the run dir is incomplete.")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own SafetensorError, OSError or RuntimeError
        raise CorruptRunDirError(
            f"`{file}` is corrupt or truncated ({type(err).__name__}: {err}); use an earlier checkpoint."
        ) from err


def _weight_files(path: Path, record: RunRecord) -> list[Path]:
    if record.format == "full":
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise CorruptRunDirError(f"`{path}` records format full but holds no {FULL_WEIGHTS}.")
        return files
    return [path / TRAINED_WEIGHTS, *([path / ADAPTER_WEIGHTS] if has_adapter(path) else [])]


def check_weight_files(path: str | os.PathLike[str]) -> None:
    """Fail before anything loads when a weight file of run dir ``path`` is missing or truncated (the
    safetensors header says how long the file must be), naming the file."""
    path = Path(path)
    for file in _weight_files(path, read_record(path)):
        if not file.is_file():
            raise CorruptRunDirError(f"`{file}` is missing: the run dir is incomplete.")
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # SafetensorError, OSError
            raise CorruptRunDirError(
                f"`{file}` is corrupt or truncated ({type(err).__name__}: {err}); use an earlier checkpoint."
            ) from err


@torch.no_grad()
def load_weights_into(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a run dir's weights into an already built ``model`` of the same layout (resume, loader).

    Full weights, or trained.safetensors (+ the LoRA adapter when ``model`` is a PeftModel).
    """
    path = Path(path)
    record = read_record(path)
    base = _unwrap(model)
    lora_layers = {
        k.replace(".base_layer.", "."): k
        for k in (_base_key(n) for n, _ in model.named_parameters())
        if ".base_layer." in k
    }
    if record.format == "full":
        weights: dict[str, torch.Tensor] = {}
        for file in _weight_files(path, record):
            weights.update(_read_safetensors(file))
        _load_strict(base, {lora_layers.get(k, k): v for k, v in weights.items()}, path, allow_tied=True)
    else:
        weights = _read_safetensors(path / TRAINED_WEIGHTS)
        rows = {k.removeprefix(_ROWS): weights.pop(k) for k in list(weights) if k.startswith(_ROWS)}
        _load_strict(base, {lora_layers.get(k, k): v for k, v in weights.items()}, path, allow_missing=True)
        n = record.base_vocab_size
        base.get_input_embeddings().weight[n:].copy_(rows["input_embeddings"])
        if "output_embeddings" in rows:
            base.get_output_embeddings().weight[n:].copy_(rows["output_embeddings"])
    adapter = has_adapter(path)
    if _is_peft(model) != adapter:
        raise ValueError(
            f"`{path}` {'holds' if adapter else 'holds no'} LoRA adapter but the model "
            f"{'is not' if adapter else 'is'} a peft model."
        )
    if adapter:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, _read_safetensors(path / ADAPTER_WEIGHTS))
        if result.unexpected_keys:
            raise ValueError(f"`{path}`: adapter keys the model does not have: {result.unexpected_keys[:5]}")


def _load_strict(
    module: nn.Module,
    weights: Mapping[str, torch.Tensor],
    path: Path,
    *,
    allow_missing: bool = False,
    allow_tied: bool = False,
) -> None:
    own = module.state_dict()
    unexpected = [k for k in weights if k not in own]
    if unexpected:
        raise ValueError(f"`{path}`: weights the model does not have: {unexpected[:5]}")
    missing = [k for k in own if k not in weights and ".lora_" not in k]
    if missing and not allow_missing:
        tied = {k for k in missing if k.endswith(("lm_head.weight", "embed_out.weight"))}
        if not (allow_tied and set(missing) <= tied):
            raise ValueError(f"`{path}`: weights missing from the checkpoint: {missing[:5]}")
    for key, value in weights.items():
        target = own[key]
        target.copy_(value.to(target.dtype))
