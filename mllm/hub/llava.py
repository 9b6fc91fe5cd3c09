"""Export to transformers' native `LlavaForConditionalGeneration` (vision tower -> 2-layer projector -> LLM).

Llava's `LlavaMultiModalProjector` is ``linear_2(act(linear_1(x)))``: mllm's ``mlp`` connector of
depth 2 maps onto it weight for weight; the ``linear`` connector is written exactly as
``linear_1`` = the projection, activation ``linear`` (identity) and ``linear_2`` = the identity
matrix with zero bias. Reference layout: transformers/models/llava/modeling_llava.py.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.activations import ACT2FN

from mllm.hub.chat_template import accepting_content_parts
from mllm.io import give_ordinary_permissions
from mllm.models.configuration_mllm import MllmConfig
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor

__all__ = ["LLAVA_VISION_TYPES", "llava_unsupported_reason", "export_llava"]

# Vision configs whose CLS handling Llava reproduces: CLIP (CLS first, "default" drops it) and
# SigLIP (no CLS: written as strategy "full", which keeps every patch token as mllm does).
LLAVA_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


def llava_unsupported_reason(config: MllmConfig) -> str | None:
    """Why ``config`` cannot be a `LlavaForConditionalGeneration`, or None when it can."""
    if config.vision_config.model_type not in LLAVA_VISION_TYPES:
        return f"vision tower `{config.vision_config.model_type}` is not one of {list(LLAVA_VISION_TYPES)}"
    if config.connector_type == "linear":
        return None
    if config.connector_type == "mlp" and config.connector_depth == 2:
        if config.connector_hidden_act not in ACT2FN:
            return f"activation `{config.connector_hidden_act}` is unknown to transformers"
        return None
    if config.connector_type == "mlp":
        return f"an mlp connector of depth {config.connector_depth} (Llava's projector has exactly 2 layers)"
    return f"a `{config.connector_type}` connector (Llava's projector is a 2-layer MLP)"


def _llava_config(config: MllmConfig, llm_embeddings_name: str) -> LlavaConfig:
    text_config = copy.deepcopy(config.text_config)
    if hasattr(text_config, "quantization_config"):
        delattr(text_config, "quantization_config")
    # Llava ties `lm_head` to `model.language_model.embed_tokens`, a name GPT-2 (`wte`) lacks: such
    # an LLM is written untied, its head a copy of the embeddings (the same numbers).
    if llm_embeddings_name != "embed_tokens":
        text_config.tie_word_embeddings = False
    has_cls = config.vision_has_cls
    return LlavaConfig(
        vision_config=copy.deepcopy(config.vision_config),
        text_config=text_config,
        image_token_index=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        projector_hidden_act=config.connector_hidden_act if config.connector_type == "mlp" else "linear",
        vision_feature_layer=config.vision_feature_layer,
        # Llava's "default" always drops the first token: right for CLIP's CLS, wrong for SigLIP.
        vision_feature_select_strategy=config.vision_feature_select_strategy if has_cls else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def _projector_weights(model: MllmForConditionalGeneration) -> dict[str, torch.Tensor]:
    connector = model.connector.state_dict()
    if model.config.connector_type == "mlp":  # layers = [Linear, act, Linear]
        names = {"layers.0": "linear_1", "layers.2": "linear_2"}
        return {
            f"model.multi_modal_projector.{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v
            for k, v in connector.items()
        }
    weight, bias = connector["proj.weight"], connector["proj.bias"]  # [D_llm, D_vis], [D_llm]
    d_llm = weight.shape[0]
    return {
        "model.multi_modal_projector.linear_1.weight": weight,
        "model.multi_modal_projector.linear_1.bias": bias,
        "model.multi_modal_projector.linear_2.weight": torch.eye(d_llm, dtype=weight.dtype),
        "model.multi_modal_projector.linear_2.bias": torch.zeros(d_llm, dtype=bias.dtype),
    }


def llava_state_dict(model: MllmForConditionalGeneration) -> dict[str, torch.Tensor]:
    """mllm's weights under Llava's names: ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
    ``model.language_model.*`` (the LLM's base model) and ``lm_head.weight``."""
    llm = model.language_model
    out = {f"model.vision_tower.{k}": v for k, v in model.vision_tower.state_dict().items()}
    out.update(_projector_weights(model))
    out.update({f"model.language_model.{k}": v for k, v in llm.base_model.state_dict().items()})
    out["lm_head.weight"] = llm.get_output_embeddings().weight
    return out


def llava_processor(processor: MllmProcessor, config: MllmConfig) -> LlavaProcessor:
    """A `LlavaProcessor` that expands `<image>` into the same ids as ``processor``."""
    has_cls = config.vision_has_cls
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy if has_cls else "full",
        chat_template=accepting_content_parts(processor.chat_template, config.image_token),
        image_token=config.image_token,
        num_additional_image_tokens=int(has_cls),
    )


@torch.no_grad()
def export_llava(
    model: MllmForConditionalGeneration, processor: MllmProcessor, output: str | os.PathLike
) -> Path:
    """Write ``model`` (merged, unquantised) and ``processor`` as a `LlavaForConditionalGeneration` folder."""
    reason = llava_unsupported_reason(model.config)
    if reason is not None:
        raise ValueError(
            f"this model cannot be exported as Llava: {reason}; export it with `--to remote-code` instead."
        )
    output = Path(output)
    llm = model.language_model
    embeddings_name = next(
        name for name, module in llm.base_model.named_children() if module is llm.get_input_embeddings()
    )
    llava_config = _llava_config(model.config, embeddings_name)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
    weights = {k: v.detach().clone() for k, v in llava_state_dict(model).items()}
    llava.load_state_dict(weights, strict=True, assign=True)
    if llava_config.tie_word_embeddings:
        llava.lm_head.weight = llava.get_input_embeddings().weight
    llava.generation_config = copy.deepcopy(model.generation_config)
    llava.eval()
    llava.save_pretrained(output)
    give_ordinary_permissions(output)  # safetensors writes 0600 files
    llava_processor(processor, model.config).save_pretrained(output)
    return output
