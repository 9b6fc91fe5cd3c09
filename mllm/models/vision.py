"""Vision towers: which Hugging Face vision models are supported and how features are selected."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from mllm.registry import Registry

__all__ = [
    "VisionFamily",
    "VISION_FAMILIES",
    "vision_family",
    "vision_config_from",
    "num_vision_tokens",
    "select_features",
]


@dataclass(frozen=True)
class VisionFamily:
    has_cls_token: bool  # the tower prepends a CLS token to the patch tokens


# Keyed by the vision config's `model_type` (a typed config field, not a path).
VISION_FAMILIES: Registry[VisionFamily] = Registry("vision tower model_type")
VISION_FAMILIES.add("clip_vision_model", VisionFamily(has_cls_token=True))
VISION_FAMILIES.add("siglip_vision_model", VisionFamily(has_cls_token=False))


def vision_family(model_type: str) -> VisionFamily:
    return VISION_FAMILIES.get(model_type)


def vision_config_from(name_or_path: str, **kwargs) -> PretrainedConfig:
    """The vision config of a tower id/path; a full CLIP/SigLIP checkpoint yields its `vision_config`."""
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    return getattr(config, "vision_config", None) or config


def num_vision_tokens(vision_config: PretrainedConfig, select_strategy: str) -> int:
    """Tokens per image the tower gives after feature selection: its patches, plus CLS when the
    strategy is ``full`` and the tower has one."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    keep_cls = vision_family(vision_config.model_type).has_cls_token and select_strategy == "full"
    return patches + int(keep_cls)


def build_vision_tower(config: PretrainedConfig) -> PreTrainedModel:
    return AutoModel.from_config(config)


def select_features(
    tower: PreTrainedModel,
    pixel_values: torch.Tensor,  # [N_img, 3, H, W]
    feature_layer: int,
    drop_cls: bool,
) -> torch.Tensor:
    """Hidden states of ``feature_layer``, CLS dropped when asked: [N_img, T_vis, D_vis]."""
    outputs = tower(pixel_values=pixel_values, output_hidden_states=True)
    features = outputs.hidden_states[feature_layer]
    return features[:, 1:] if drop_cls else features
