"""Configuration of an mllm model exported with its own code (written by `mllm export --to remote-code`).

Needs only transformers: a vision tower config, an LLM config, the connector between them.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["MllmRemoteConfig"]


@strict
class MllmRemoteConfig(PreTrainedConfig):
    model_type = "mllm_remote"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig, optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None  # the vision tower (CLIP, SigLIP, ...)
    text_config: dict | PreTrainedConfig | None = None  # the causal LLM
    qformer_config: dict | PreTrainedConfig | None = None  # BLIP-2 Q-Former, for connector_type="qformer"
    connector_type: str = "mlp"  # linear | mlp | qformer
    connector_depth: int = 2  # Linear layers of the mlp connector
    connector_hidden_act: str = "gelu"  # activation between mlp layers
    num_query_tokens: int = 32  # Q-Former queries = image tokens per image
    vision_feature_layer: int = -2  # hidden state of the vision tower fed to the connector
    vision_feature_select_strategy: str = (
        "default"  # default drops CLS (when the tower has one), full keeps it
    )
    vision_has_cls: bool = True  # the vision tower prepends a CLS token
    num_image_tokens: int = 1  # tokens each image occupies in the LLM input
    image_token: str = "<image>"  # placeholder string in prompts
    image_token_id: int | None = None  # its id in the LLM vocabulary
    tie_word_embeddings: bool = False  # the LLM ties its own embeddings through text_config
