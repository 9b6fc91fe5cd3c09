"""What trains: freeze / full / LoRA / QLoRA per component, in one explicit, logged function.

`apply_tuning` is the only place that changes ``requires_grad`` or injects adapters; loaders never
freeze. QLoRA is decided at load time (`llm_quantization_config`), because bitsandbytes quantises
while the weights are read.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from mllm.config import TuningArguments

__all__ = [
    "COMPONENTS",
    "apply_tuning",
    "component_of",
    "llm_quantization_config",
    "lora_target_pattern",
    "trainable_parameter_table",
    "tuning_of",
    "unwrap_mllm",
]

logger = logging.getLogger(__name__)

COMPONENTS = ("vision_tower", "connector", "language_model", "lora")
_PEFT_PREFIX = "base_model.model."


def tuning_of(recorded: Mapping[str, Any]) -> TuningArguments:
    """`TuningArguments` from a run record's ``tuning`` dict (keys this version does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(TuningArguments)}
    return TuningArguments(**{k: v for k, v in recorded.items() if k in known})


def llm_quantization_config(tuning: TuningArguments) -> BitsAndBytesConfig | None:
    """The 4-bit NF4 config the LLM is loaded with for ``tune_llm=qlora`` (QLoRA, Dettmers et al. 2023); else None.

    Only the LLM is quantised: the vision tower and the connector are loaded without it.
    """
    if tuning.tune_llm != "qlora":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=tuning.bnb_4bit_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, tuning.bnb_4bit_compute_dtype),
    )


def unwrap_mllm(model: nn.Module) -> nn.Module:
    """The `MllmForConditionalGeneration` under a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _is_linear(module: nn.Module) -> bool:
    # bnb's Linear4bit subclasses nn.Linear; GPT-2 uses transformers' Conv1D.
    return isinstance(module, (nn.Linear, Conv1D))


def _linear_suffixes(component: nn.Module, exclude: Iterable[nn.Module] = (), within: str = "") -> set[str]:
    skip = {id(m) for m in exclude}
    return {
        name.rsplit(".", 1)[-1]
        for name, module in component.named_modules()
        if name and _is_linear(module) and id(module) not in skip and within in f".{name}."
    }


def lora_target_pattern(model: nn.Module, tuning: TuningArguments) -> str | None:
    """peft ``target_modules`` regex (full match on module names) for the components tuned with LoRA.

    LLM: ``lora_target_modules`` or, when None, every linear layer except the output embeddings.
    Vision tower (``tune_vision=lora`` only): every linear layer of its encoder (not a pooling head,
    whose outputs the connector never reads). The connector is never a target.
    """
    patterns = []
    if tuning.tune_llm in ("lora", "qlora"):
        llm = model.language_model
        names = tuning.lora_target_modules or sorted(
            _linear_suffixes(llm, exclude=[llm.get_output_embeddings()])
        )
        patterns.append(rf"language_model\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})")
    if tuning.tune_vision == "lora":
        names = sorted(_linear_suffixes(model.vision_tower, within=".encoder."))
        patterns.append(rf"vision_tower\.(?:.*\.)?encoder\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})")
    if not patterns:
        return None
    return "|".join(f"(?:{p})" for p in patterns)


def apply_tuning(
    model: nn.Module, tuning: TuningArguments, *, gradient_checkpointing: bool = False
) -> nn.Module:
    """Freeze, fully tune or LoRA-adapt each component as ``tuning`` says; return the model to train.

    With any LoRA the result is a `peft.PeftModel` around the `MllmForConditionalGeneration`.
    QLoRA needs the LLM already loaded with `llm_quantization_config`. Logs the trainable-parameter table.
    """
    if isinstance(model, PeftModel):
        raise ValueError("apply_tuning got a model that already carries a peft adapter; apply it once.")
    if tuning.tune_llm == "full" and tuning.tune_vision == "lora":
        raise ValueError(
            "tune_llm=full with tune_vision=lora is not supported (a full-weight output dir carries no "
            "adapter); use tune_vision=full or frozen."
        )
    quantized = bool(getattr(model.language_model, "is_loaded_in_4bit", False))
    if (tuning.tune_llm == "qlora") != quantized:
        raise ValueError(
            f"tune_llm={tuning.tune_llm} but the LLM is {'' if quantized else 'not '}loaded in 4-bit: load it "
            "with llm_quantization_config(tuning) exactly when tune_llm=qlora."
        )
    model.requires_grad_(False)
    if quantized:
        # peft's QLoRA preparation, applied to the LLM only: run on the whole model it would also
        # upcast the vision tower and the connector.
        prepare_model_for_kbit_training(
            model.language_model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    target = lora_target_pattern(model, tuning)
    if target is not None:
        lora_config = LoraConfig(
            r=tuning.lora_r,
            lora_alpha=tuning.lora_alpha,
            lora_dropout=tuning.lora_dropout,
            target_modules=target,
            use_dora=tuning.use_dora,
            bias="none",
        )
        model = get_peft_model(model, lora_config)
    base = unwrap_mllm(model)
    for component, mode in (
        (base.vision_tower, tuning.tune_vision),
        (base.connector, tuning.tune_connector),
        (base.language_model, tuning.tune_llm),
    ):
        if mode == "full":
            component.requires_grad_(True)
    # Gradient checkpointing with frozen embeddings needs the embedding output to require grad;
    # transformers' gradient_checkpointing_enable (called by Trainer) installs that hook itself.
    logger.info("trainable parameters\n%s", trainable_parameter_table(model))
    return model


def _numel(param: torch.Tensor) -> int:
    quant_state = getattr(param, "quant_state", None)  # bnb Params4bit store two 4-bit values per byte
    if quant_state is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def component_of(name: str) -> str:
    """``vision_tower`` / ``connector`` / ``language_model`` / ``lora`` for a parameter name."""
    name = name.removeprefix(_PEFT_PREFIX)
    if ".lora_" in name or "lora_magnitude_vector" in name:
        return "lora"
    return name.split(".", 1)[0]


def trainable_parameter_table(model: nn.Module) -> str:
    """Per component (vision_tower, connector, language_model, lora): trainable / total parameters."""
    counts = {c: [0, 0] for c in COMPONENTS}
    for name, param in model.named_parameters():
        row = counts.setdefault(component_of(name), [0, 0])
        n = _numel(param)
        row[1] += n
        row[0] += n if param.requires_grad else 0
    lines = [f"{'component':<16}{'trainable':>14}{'total':>14}{'%':>8}"]
    total = [0, 0]
    for component, (trainable, all_) in counts.items():
        pct = 100.0 * trainable / all_ if all_ else 0.0
        lines.append(f"{component:<16}{trainable:>14,}{all_:>14,}{pct:>7.2f}%")
        total[0] += trainable
        total[1] += all_
    pct = 100.0 * total[0] / total[1] if total[1] else 0.0
    lines.append(f"{'total':<16}{total[0]:>14,}{total[1]:>14,}{pct:>7.2f}%")
    return "\n".join(lines)
