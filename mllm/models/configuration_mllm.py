"""`MllmConfig`: a vision tower config, an LLM config and the connector between them."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from mllm.models.connectors import CONNECTORS
from mllm.models.vision import num_vision_tokens, vision_family

__all__ = ["ARCHITECTURE_FIELDS", "RECIPE_ARCHITECTURE_KEYS", "MllmConfig"]

# The MllmConfig fields that make up the architecture beyond the two component configs: what
# `MllmForConditionalGeneration.from_components(**config.architecture())` needs to rebuild a model.
ARCHITECTURE_FIELDS = (
    "connector_type",
    "connector_depth",
    "connector_hidden_act",
    "num_query_tokens",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_token",
    "qformer_config",
)
# The recipe keys (`mllm.config.ModelArguments`) that set an architecture field of the same name.
RECIPE_ARCHITECTURE_KEYS = (
    "connector_type",
    "connector_depth",
    "num_query_tokens",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_token",
)


@strict
class MllmConfig(PreTrainedConfig):
    """Configuration of `MllmForConditionalGeneration`.

    The number of image tokens each image becomes (`num_image_tokens`) is derived here, and only here,
    from the vision tower and connector settings.
    """

    model_type = "mllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig, optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None  # the vision tower (CLIP, SigLIP, ...)
    text_config: dict | PreTrainedConfig | None = None  # the causal LLM (Llama, Qwen2, GPT-2, ...)
    qformer_config: dict | PreTrainedConfig | None = (
        None  # BLIP-2 Q-Former, only for connector_type="qformer"
    )
    connector_type: str = "mlp"  # registry name: linear | mlp | qformer
    connector_depth: int = 2  # Linear layers of the mlp connector (LLaVA-1.5's mlp2x_gelu = 2)
    connector_hidden_act: str = "gelu"  # activation between mlp layers
    num_query_tokens: int = 32  # learned queries of the Q-Former = image tokens per image
    vision_feature_layer: int = -2  # hidden state of the vision tower fed to the connector (LLaVA: -2)
    vision_feature_select_strategy: Literal["default", "full"] = "default"  # default drops CLS, full keeps it
    image_token: str = "<image>"  # placeholder string in prompts
    image_token_id: int | None = None  # its id in the LLM vocabulary (set when the processor adds it)
    tie_word_embeddings: bool = False  # the LLM ties its own embeddings through text_config

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        CONNECTORS.get(self.connector_type)  # fails early, listing the valid names
        if self.connector_depth < 1:
            raise ValueError(f"connector_depth must be >= 1, got {self.connector_depth}.")
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}.")
        vision_family(self.vision_config.model_type)  # fails early on an unsupported vision tower
        if self.connector_type == "qformer" and self.qformer_config is None:
            self.qformer_config = Blip2QFormerConfig(
                hidden_size=self.vision_config.hidden_size,
                num_hidden_layers=2,
                num_attention_heads=self.vision_config.num_attention_heads,
                intermediate_size=self.vision_config.hidden_size * 4,
                encoder_hidden_size=self.vision_config.hidden_size,
            )
        if (
            self.qformer_config is not None
            and self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size
        ):
            raise ValueError(
                f"qformer_config.encoder_hidden_size ({self.qformer_config.encoder_hidden_size}) must equal the "
                f"vision tower's hidden_size ({self.vision_config.hidden_size})."
            )
        n_layers = self.vision_config.num_hidden_layers
        if not -n_layers - 1 <= self.vision_feature_layer <= n_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is out of range for a vision tower with "
                f"{n_layers} layers (hidden states are indexed -{n_layers + 1}..{n_layers})."
            )

    def architecture(self) -> dict:
        """The `ARCHITECTURE_FIELDS` of this config: `from_components` keyword arguments that rebuild it."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

    @property
    def vision_has_cls(self) -> bool:
        return vision_family(self.vision_config.model_type).has_cls_token

    @property
    def num_vision_tokens(self) -> int:
        """Tokens per image coming out of the vision tower after feature selection."""
        return num_vision_tokens(self.vision_config, self.vision_feature_select_strategy)

    @property
    def num_image_tokens(self) -> int:
        """Tokens each image occupies in the LLM input: the one place this number is derived."""
        if self.connector_type == "qformer":
            return self.num_query_tokens
        return self.num_vision_tokens
