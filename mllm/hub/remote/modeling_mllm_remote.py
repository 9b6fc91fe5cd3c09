"""An mllm model exported with its own code (written by `mllm export --to remote-code`).

vision tower -> connector (linear, MLP of any depth, or BLIP-2 Q-Former) -> image features written
into the image-token positions of a causal LLM. Needs only transformers and torch; the weight
names and the forward are those of mllm's `MllmForConditionalGeneration`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, Blip2QFormerModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mllm_remote import MllmRemoteConfig

__all__ = ["MllmRemoteForConditionalGeneration", "MllmRemotePreTrainedModel"]


class LinearConnector(nn.Module):
    def __init__(self, config: MllmRemoteConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, T, D_vis] -> [N, T, D_llm]
        return self.proj(features)


class MlpConnector(nn.Module):
    def __init__(self, config: MllmRemoteConfig) -> None:
        super().__init__()
        d_vis, d_llm = config.vision_config.hidden_size, config.text_config.hidden_size
        layers: list[nn.Module] = [nn.Linear(d_vis, d_llm)]
        for _ in range(config.connector_depth - 1):
            layers += [ACT2FN[config.connector_hidden_act], nn.Linear(d_llm, d_llm)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, T, D_vis] -> [N, T, D_llm]
        return self.layers(features)


class QFormerConnector(nn.Module):
    """BLIP-2 (https://arxiv.org/abs/2301.12597): learned queries cross-attend to vision features."""

    def __init__(self, config: MllmRemoteConfig) -> None:
        super().__init__()
        qcfg = config.qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        # learned position embeddings of the vision tokens, when the model was trained with them
        n_positions = int(getattr(qcfg, "num_vision_positions", 0) or 0)
        self.vision_positions = (
            nn.Parameter(torch.zeros(1, n_positions, qcfg.encoder_hidden_size)) if n_positions else None
        )
        self.qformer = Blip2QFormerModel(qcfg)
        self.proj = nn.Linear(qcfg.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, T_vis, D_vis] -> [N, Q, D_llm]
        if self.vision_positions is not None:
            features = features + self.vision_positions.to(features.dtype)
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # [N, Q, D_q]
        encoder_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=encoder_mask
        )
        return self.proj(out.last_hidden_state)  # [N, Q, D_llm]


CONNECTORS = {"linear": LinearConnector, "mlp": MlpConnector, "qformer": QFormerConnector}


class MllmRemotePreTrainedModel(PreTrainedModel):
    config: MllmRemoteConfig
    config_class = MllmRemoteConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []


class MllmRemoteForConditionalGeneration(MllmRemotePreTrainedModel, GenerationMixin):
    """``vision_tower`` -> ``connector`` -> ``language_model``."""

    def __init__(self, config: MllmRemoteConfig) -> None:
        super().__init__(config)
        if config.connector_type not in CONNECTORS:
            raise ValueError(f"connector_type `{config.connector_type}` is not one of {sorted(CONNECTORS)}")
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.connector = CONNECTORS[config.connector_type](config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_img, 3, H, W] -> [N_img, num_image_tokens, D_llm]."""
        drop_cls = self.config.vision_has_cls and self.config.vision_feature_select_strategy == "default"
        tower_dtype = next(self.vision_tower.parameters()).dtype
        outputs = self.vision_tower(pixel_values=pixel_values.to(tower_dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.config.vision_feature_layer]  # [N_img, T_vis, D_vis]
        features = features[:, 1:] if drop_cls else features
        return self.connector(features.to(next(self.connector.parameters()).dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            image_mask = input_ids == self.config.image_token_id  # [B, T]
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, D_llm]
            if pixel_values is not None and bool(image_mask.any()):
                features = self.get_image_features(pixel_values)  # [N_img, T_img, D_llm]
                if int(image_mask.sum()) != features.shape[0] * features.shape[1]:
                    raise ValueError(
                        f"the input holds {int(image_mask.sum())} image-token positions but the images give "
                        f"{features.shape[0] * features.shape[1]} features; build inputs with the processor."
                    )
                features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
                mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
                inputs_embeds = inputs_embeds.masked_scatter(mask, features)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
