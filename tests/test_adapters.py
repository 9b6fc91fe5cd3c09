"""apply_tuning: LoRA targets, QLoRA keeps vision/connector unquantised, DoRA, gradient checkpointing."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

from mllm.config import TuningArguments
from mllm.models.adapters import apply_tuning, llm_quantization_config, lora_target_pattern, unwrap_mllm
from mllm.models.modeling_mllm import MllmForConditionalGeneration


def tiny(components, tuning: TuningArguments, dtype=None):
    return MllmForConditionalGeneration.from_components(
        str(components["clip-vision"]),
        str(components["llama"]),
        quantization_config=llm_quantization_config(tuning),
        dtype=dtype,
    )


def lora_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def test_default_targets_are_every_llm_linear_but_the_head(tiny_components):
    tuning = TuningArguments(tune_llm="lora", lora_r=2, lora_alpha=4)
    model = apply_tuning(tiny(tiny_components, tuning), tuning)
    names = lora_modules(model)
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".language_model." in n for n in names)
    assert not any("lm_head" in n for n in names)
    assert unwrap_mllm(model).language_model.lm_head.weight.requires_grad is False


def test_explicit_targets_and_vision_lora(tiny_components):
    tuning = TuningArguments(
        tune_llm="lora", tune_vision="lora", lora_target_modules=["q_proj", "v_proj"], lora_r=2
    )
    model = tiny(tiny_components, tuning)
    pattern = lora_target_pattern(model, tuning)
    model = apply_tuning(model, tuning)
    names = lora_modules(model)
    assert {n.rsplit(".", 1)[-1] for n in names if ".language_model." in n} == {"q_proj", "v_proj"}
    vision = [n for n in names if ".vision_tower." in n]
    assert vision and all(".encoder." in n for n in vision), pattern
    assert not any(".connector." in n for n in names)


def test_qlora_quantises_only_the_llm(tiny_components):
    tuning = TuningArguments(tune_llm="qlora", lora_r=2, bnb_4bit_compute_dtype="bfloat16")
    model = apply_tuning(
        tiny(tiny_components, tuning, dtype=torch.bfloat16), tuning, gradient_checkpointing=True
    )
    base = unwrap_mllm(model)
    llm_4bit = [m for m in base.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert llm_4bit and llm_4bit[0].weight.quant_type == "nf4"
    assert llm_4bit[0].compute_dtype == torch.bfloat16
    for component in (base.vision_tower, base.connector):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in component.modules())
        # peft's kbit preparation, run on the whole model, would upcast these to float32
        assert {p.dtype for p in component.parameters()} == {torch.bfloat16}


def test_qlora_requires_a_4bit_llm(tiny_components):
    with pytest.raises(ValueError, match="4-bit"):
        apply_tuning(tiny(tiny_components, TuningArguments()), TuningArguments(tune_llm="qlora"))


def test_dora(tiny_components):
    tuning = TuningArguments(tune_llm="lora", use_dora=True, lora_r=2)
    model = apply_tuning(tiny(tiny_components, tuning), tuning)
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_with_frozen_embeddings_trains_lora(tiny_components):
    tuning = TuningArguments(tune_llm="lora", tune_connector="frozen", lora_r=2)
    model = apply_tuning(tiny(tiny_components, tuning), tuning, gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])  # text only: nothing upstream of the LLM requires grad
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_full_llm_with_vision_lora_is_refused(tiny_components):
    with pytest.raises(ValueError, match="tune_vision=lora"):
        apply_tuning(
            tiny(tiny_components, TuningArguments()), TuningArguments(tune_llm="full", tune_vision="lora")
        )


def test_lora_returns_peft_model_and_loaders_do_not_freeze(tiny_components):
    model = tiny(tiny_components, TuningArguments())
    assert all(p.requires_grad for p in model.parameters())  # the loader froze nothing
    assert isinstance(apply_tuning(model, TuningArguments(tune_llm="lora", lora_r=2)), PeftModel)
