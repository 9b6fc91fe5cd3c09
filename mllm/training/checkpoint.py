"""The output-dir format every save writes (final dir and each ``checkpoint-N``), and its readers.

An output dir holds ``config.json`` (MllmConfig) + processor files + ``mllm_run.json`` + weights:

(a) ``model.safetensors`` — full weights, when the LLM differs from its component (fully tuned, or
    a merged LoRA from an earlier stage);
(b) ``trained.safetensors`` — only what differs from the recorded components: the connector, the
    vision tower if it was tuned fully, and the embedding rows of tokens added to the LLM vocabulary
    (``<image>``: their random init is not reproducible) — plus, with LoRA/QLoRA, peft's
    ``adapter_config.json`` + ``adapter_model.safetensors``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.models.adapters import unwrap_mllm

__all__ = [
    "RUN_RECORD",
    "TRAINED_WEIGHTS",
    "FULL_WEIGHTS",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "NotAnOutputDirError",
    "atomic_dir",
    "make_run_record",
    "read_run_record",
    "save_output_dir",
    "load_weights_into",
]

RUN_RECORD = "mllm_run.json"
TRAINED_WEIGHTS = "trained.safetensors"
FULL_WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ROWS = "__added_rows__."  # key prefix in trained.safetensors for rows of tokens added to the vocabulary
_PEFT_PREFIX = "base_model.model."


class NotAnOutputDirError(ValueError):
    """A path that is not an mllm output directory."""


def make_run_record(
    *,
    vision_tower: str,
    model_name_or_path: str,
    tuning: Mapping[str, Any],
    base_vocab_size: int,
    config: Mapping[str, Any] | None = None,
    inherited_modified: list[str] | None = None,
) -> dict[str, Any]:
    """The ``mllm_run.json`` content: the components, the tuning, what differs from the components, the run's config."""
    modified = {"connector", *(inherited_modified or [])}
    if tuning["tune_vision"] == "full":
        modified.add("vision_tower")
    if tuning["tune_llm"] == "full":
        modified.add("language_model")
    return {
        "vision_tower": str(vision_tower),
        "model_name_or_path": str(model_name_or_path),
        "tuning": dict(tuning),
        "modified": sorted(modified),  # components whose weights differ from the recorded ones
        "base_vocab_size": int(base_vocab_size),  # the LLM's vocabulary before <image> was added
        "format": "full" if "language_model" in modified else "trained",
        "config": _jsonable(dict(config or {})),
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def read_run_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``mllm_run.json``; a clear error naming ``path`` when it is not an mllm output dir."""
    path = Path(path)
    record = path / RUN_RECORD
    if not path.is_dir() or not record.is_file() or not (path / "config.json").is_file():
        raise NotAnOutputDirError(
            f"`{path}` is not an mllm output directory: expected config.json and {RUN_RECORD} "
            "(written by `mllm train`) in it."
        )
    return json.loads(record.read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging dir beside ``final``; on success it replaces ``final`` by rename, on error it is removed.

    A crash while writing therefore leaves whatever ``final`` held before intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


@contextlib.contextmanager
def _scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A temporary dir beside the destination (same filesystem, so os.replace is a rename), always removed."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.partial-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def save_output_dir(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    processor: Any,
    run_record: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (an MllmForConditionalGeneration, maybe inside a PeftModel) in the output-dir format.

    ``state_dict`` (keys of ``model``) replaces ``model.state_dict()`` — under DeepSpeed ZeRO-3 it is the
    gathered one. Writes into a staging dir and moves each file into ``output_dir`` (which may already
    hold ``checkpoint-*`` folders), so a crash never leaves a half-written weight file in place.
    """
    output_dir = Path(output_dir)
    base = unwrap_mllm(model)
    if state_dict is None:
        state_dict = model.state_dict()
    sd = {_base_key(k): v for k, v in state_dict.items()}
    record = dict(run_record)
    peft = isinstance(model, PeftModel)
    if record["format"] == "full" and peft:
        raise ValueError("a full-weight output dir cannot also carry a LoRA adapter (merge it first).")
    staging_parent = output_dir.parent
    staging_parent.mkdir(parents=True, exist_ok=True)
    with _scratch_dir(staging_parent, output_dir.name) as tmp:
        _clean_config(base.config).save_pretrained(tmp)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if record["format"] == "full":
            base.save_pretrained(tmp, state_dict={k: v for k, v in sd.items() if not _is_lora_key(k)})
        else:
            save_file(_trained_tensors(base, sd, record), tmp / TRAINED_WEIGHTS, metadata={"format": "pt"})
            if peft:
                model.save_pretrained(tmp, state_dict=dict(state_dict), save_embedding_layers=False)
        (tmp / RUN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in (FULL_WEIGHTS, TRAINED_WEIGHTS, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (tmp / stale).exists():
                (output_dir / stale).unlink(missing_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == RUN_RECORD):  # the record goes last
            os.replace(item, output_dir / item.name)
    return output_dir


def _trained_tensors(base: nn.Module, sd: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> dict:
    """connector + fully tuned vision tower + the rows of tokens added to the LLM vocabulary."""
    modified = set(record["modified"])
    out = {
        k: v
        for k, v in sd.items()
        if k.split(".", 1)[0] in modified and k.split(".", 1)[0] != "language_model" and not _is_lora_key(k)
    }
    # peft wraps LoRA-targeted layers: `x.base_layer.weight` is the original `x.weight`.
    out = {k.replace(".base_layer.", "."): v for k, v in out.items()}
    n = record["base_vocab_size"]
    embeddings = base.get_input_embeddings().weight
    out[_ROWS + "input_embeddings"] = sd[_param_name(base, embeddings)][n:]
    head = base.get_output_embeddings()
    if head is not None and head.weight is not embeddings:
        out[_ROWS + "output_embeddings"] = sd[_param_name(base, head.weight)][n:]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


@torch.no_grad()
def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an output dir's weights into an already built ``model`` of the same layout (resume, loader).

    Full weights, or trained.safetensors (+ the LoRA adapter when ``model`` is a PeftModel).
    """
    path = Path(path)
    record = read_run_record(path)
    base = unwrap_mllm(model)
    lora_layers = {
        k.replace(".base_layer.", "."): k
        for k in (_base_key(n) for n, _ in model.named_parameters())
        if ".base_layer." in k
    }
    if record["format"] == "full":
        from transformers.modeling_utils import load_state_dict

        weights = {}
        for file in sorted(path.glob("model*.safetensors")):
            weights.update(load_state_dict(str(file)))
        _load_strict(base, {lora_layers.get(k, k): v for k, v in weights.items()}, path, allow_tied=True)
    else:
        weights = load_file(str(path / TRAINED_WEIGHTS))
        rows = {k.removeprefix(_ROWS): weights.pop(k) for k in list(weights) if k.startswith(_ROWS)}
        _load_strict(base, {lora_layers.get(k, k): v for k, v in weights.items()}, path, allow_missing=True)
        n = record["base_vocab_size"]
        base.get_input_embeddings().weight[n:].copy_(rows["input_embeddings"])
        if "output_embeddings" in rows:
            base.get_output_embeddings().weight[n:].copy_(rows["output_embeddings"])
    has_adapter = (path / ADAPTER_CONFIG).is_file()
    if isinstance(model, PeftModel) != has_adapter:
        raise ValueError(
            f"`{path}` {'holds' if has_adapter else 'holds no'} LoRA adapter but the model "
            f"{'is not' if has_adapter else 'is'} a peft model."
        )
    if has_adapter:
        adapter = load_file(str(path / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(model, adapter)
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
