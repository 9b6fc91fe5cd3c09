"""BLIP-2 stage 1: a frozen vision tower and the Q-Former with its text branch, trained by ITC + ITM + ITG.

Follows BLIP-2 (Li et al. 2023, https://arxiv.org/abs/2301.12597, Sec. 3.2) and LAVIS'
``Blip2Qformer.forward`` (salesforce/LAVIS, lavis/models/blip2_models/blip2_qformer.py):

- ITC: query outputs and the text's first ([CLS]) output, each projected to ``embed_dim`` and
  L2-normalised; image-text similarity = max over queries; InfoNCE or sigmoid (`ContrastiveHead`);
- ITM: for every image a hard-negative text and for every text a hard-negative image, mined from
  the ITC similarities of the gathered batch; binary head on the query outputs, averaged over queries;
- ITG: the text with its first token replaced by [DEC], generated under the multimodal causal
  mask; causal LM loss on every non-padding token after [DEC].

One deliberate difference from LAVIS: ITC runs queries and text in one pass under the unimodal
mask (LAVIS runs two passes; the outputs are the same, which `test_qformer_masks` checks), and ITG
recomputes the queries under its own mask instead of reusing ITC's key/value cache (same result).
``forward`` returns the summed loss, so `transformers.Trainer` trains this model as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from mllm.models.connectors.qformer_text import (
    QFormerWithText,
    bidirectional_mask,
    multimodal_causal_mask,
    unimodal_mask,
)
from mllm.models.losses import (
    ContrastiveHead,
    gather_with_grad,
    gathered_offset,
    itc_similarity,
    mine_hard_negatives,
)
from mllm.models.vision import build_vision_tower, select_features, vision_family

__all__ = [
    "QFormerPretrainConfig",
    "QFormerPretrainModel",
    "QFormerPretrainOutput",
    "connector_key",
    "connector_state_dict",
    "is_text_ffn_key",
]


@strict
class QFormerPretrainConfig(PreTrainedConfig):
    """Configuration of `QFormerPretrainModel` (BLIP-2 stage 1)."""

    model_type = "mllm_qformer_pretrain"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None  # the frozen vision tower
    qformer_config: dict | PreTrainedConfig | None = None  # Q-Former size; vocab_size = the text vocabulary
    num_query_tokens: int = 32  # learned queries (BLIP-2: 32)
    embed_dim: int = 256  # ITC projection width (BLIP-2: 256)
    contrastive_loss: Literal["infonce", "sigmoid"] = "infonce"  # CLIP InfoNCE or SigLIP sigmoid
    itc_label_smoothing: float = 0.1  # InfoNCE label smoothing (LAVIS: 0.1)
    itg_label_smoothing: float = 0.1  # ITG label smoothing (LAVIS: 0.1)
    vision_feature_layer: int = -2  # vision hidden state the queries cross-attend (BLIP-2: second to last)
    vision_feature_select_strategy: Literal["default", "full"] = "full"  # full keeps CLS (BLIP-2 does)
    cls_token_id: int = 0  # first text token for ITC / ITM ([CLS])
    dec_token_id: int = 1  # first text token for ITG ([DEC])
    max_text_length: int = 32  # text tokens, [CLS] included (BLIP-2: 32)

    def __post_init__(self, **kwargs):
        if self.qformer_config is None:
            self.qformer_config = Blip2QFormerConfig()
        super().__post_init__(**kwargs)
        vision_family(self.vision_config.model_type)
        self.qformer_config.use_qformer_text_input = True
        if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"qformer_config.encoder_hidden_size ({self.qformer_config.encoder_hidden_size}) must equal the "
                f"vision tower's hidden_size ({self.vision_config.hidden_size})."
            )
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}.")
        if self.contrastive_loss not in ("infonce", "sigmoid"):
            raise ValueError(f"contrastive_loss must be infonce or sigmoid, got {self.contrastive_loss!r}.")


@dataclass
class QFormerPretrainOutput(ModelOutput):
    loss: torch.Tensor | None = None  # itc + itm + itg
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_itg: torch.Tensor | None = None
    image_feats: torch.Tensor | None = None  # [B, Q, embed_dim], normalised
    text_feats: torch.Tensor | None = None  # [B, embed_dim], normalised


class QFormerPretrainModel(PreTrainedModel):
    config: QFormerPretrainConfig
    config_class = QFormerPretrainConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    _supports_sdpa = True

    def __init__(self, config: QFormerPretrainConfig) -> None:
        super().__init__(config)
        qcfg = config.qformer_config
        self.vision_tower = build_vision_tower(config.vision_config)
        self.qformer = QFormerWithText(qcfg, config.num_query_tokens)
        self.vision_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.contrastive = ContrastiveHead(config.contrastive_loss, config.itc_label_smoothing)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.vision_tower or module is self.contrastive:
            return
        std = self.config.qformer_config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- features -------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, T_vis, D_vis] from the (frozen) tower."""
        drop_cls = (
            vision_family(self.config.vision_config.model_type).has_cls_token
            and self.config.vision_feature_select_strategy == "default"
        )
        dtype = next(self.vision_tower.parameters()).dtype
        return select_features(
            self.vision_tower, pixel_values.to(dtype), self.config.vision_feature_layer, drop_cls
        )

    def image_embeddings(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Vision features [B, T_vis, D_vis] -> normalised ITC query embeddings [B, Q, embed_dim]."""
        queries = self.qformer(image_embeds.float())  # no text: queries only
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text [B, T] -> normalised ITC [CLS] embedding [B, embed_dim] (text alone, no queries)."""
        hidden = self.qformer(None, input_ids, text_mask=attention_mask)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    @torch.no_grad()
    def similarity(
        self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITC similarity of every image ([N_i, T_vis, D_vis] features) to every text ([N_t, T]): [N_i, N_t],
        the matrix `mllm.evaluation.retrieval.retrieval_metrics` takes."""
        return itc_similarity(
            self.image_embeddings(image_features), self.text_embeddings(input_ids, attention_mask)
        )

    def itm_scores(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """P(matched) of each (image, text) row pair: [B]."""
        return self._itm_logits(image_embeds, input_ids, attention_mask).softmax(dim=-1)[:, 1]

    def _itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        q = self.config.num_query_tokens
        hidden = self.qformer(
            image_embeds.float(), input_ids, allowed=bidirectional_mask(attention_mask, q)
        )  # [B, Q+T, D_q]
        return self.itm_head(hidden[:, :q]).mean(dim=1)  # [B, 2]

    # -- training -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T], starting with cls_token_id
        attention_mask: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor | None = None,  # [B, 3, H, W]
        image_features: torch.Tensor | None = None,  # [B, T_vis, D_vis] instead of pixel_values
        **kwargs,
    ) -> QFormerPretrainOutput:
        q = self.config.num_query_tokens
        if image_features is None:
            with torch.no_grad():
                image_features = self.vision_features(pixel_values)
        image_embeds = image_features.float()  # [B, T_vis, D_vis]
        batch = image_embeds.shape[0]

        # ITC: one pass, unimodal mask: query outputs see the image only, text outputs the text only.
        hidden = self.qformer(image_embeds, input_ids, allowed=unimodal_mask(attention_mask, q))
        image_feats = F.normalize(self.vision_proj(hidden[:, :q]), dim=-1)  # [B, Q, E]
        text_feats = F.normalize(self.text_proj(hidden[:, q]), dim=-1)  # [B, E]
        loss_itc, sim_i2t, sim_t2i = self.contrastive(image_feats, text_feats)

        # ITM: positives + one hard negative per image and per text, mined across the gathered batch.
        all_images = gather_with_grad(image_embeds)  # [N, T_vis, D_vis]
        all_ids = gather_with_grad(input_ids)  # [N, T]
        all_mask = gather_with_grad(attention_mask)
        positives = torch.arange(batch, device=input_ids.device) + gathered_offset(batch)
        if all_images.shape[0] < 2:  # a lone sample has no negative: ITM on the positive only
            itm_images, itm_ids, itm_mask = image_embeds, input_ids, attention_mask
            itm_labels = torch.ones(batch, dtype=torch.long, device=input_ids.device)
        else:
            neg_image = mine_hard_negatives(sim_t2i, positives)  # [B] for each text
            neg_text = mine_hard_negatives(sim_i2t, positives)  # [B] for each image
            itm_images = torch.cat([image_embeds, all_images[neg_image], image_embeds])  # [3B, T_vis, D_vis]
            itm_ids = torch.cat([input_ids, input_ids, all_ids[neg_text]])  # [3B, T]
            itm_mask = torch.cat([attention_mask, attention_mask, all_mask[neg_text]])
            itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(input_ids.device)
        loss_itm = F.cross_entropy(self._itm_logits(itm_images, itm_ids, itm_mask), itm_labels)

        # ITG: [DEC] + text under the multimodal causal mask, next-token loss on the real tokens.
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.config.dec_token_id
        hidden = self.qformer(image_embeds, dec_ids, allowed=multimodal_causal_mask(attention_mask, q))
        logits = self.qformer.lm_head(hidden[:, q:])  # [B, T, V]
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        loss_itg = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=self.config.itg_label_smoothing,
        )
        return QFormerPretrainOutput(
            loss=loss_itc + loss_itm + loss_itg,
            loss_itc=loss_itc.detach(),
            loss_itm=loss_itm.detach(),
            loss_itg=loss_itg.detach(),
            image_feats=image_feats,
            text_feats=text_feats,
        )


def is_text_ffn_key(key: str) -> bool:
    """A text-only feed-forward weight of a Q-Former layer (``encoder.layer.N.intermediate|output.``),
    which stage 2 drops as LAVIS' Blip2OPT does (its queries never use it)."""
    parts = key.split(".")
    for i in range(len(parts) - 3):
        if parts[i] == "encoder" and parts[i + 1] == "layer" and parts[i + 3] in ("intermediate", "output"):
            return True
    return False


def connector_key(key: str) -> str | None:
    """The `QFormerConnector` key of a stage-1 state-dict key (``qformer.query_tokens``,
    ``qformer.vision_positions``, ``qformer.qformer.*``), or None for what the connector does not
    hold: the vision tower, the ITC / ITM / ITG heads, the text embeddings and the text FFNs."""
    if key in ("qformer.query_tokens", "qformer.vision_positions"):
        return key.removeprefix("qformer.")
    if key.startswith("qformer.qformer.") and not is_text_ffn_key(key):
        return key.removeprefix("qformer.")
    return None


def connector_state_dict(model: QFormerPretrainModel) -> dict[str, torch.Tensor]:
    """The stage-1 weights that `QFormerConnector` holds (``query_tokens``, ``vision_positions`` if any,
    ``qformer.*``), text FFNs dropped."""
    return {
        target: value.detach()
        for key, value in model.state_dict().items()
        if (target := connector_key(key)) is not None
    }
