"""BLIP-2 Q-Former with its text branch: the three stage-1 attention masks and the ITG head.

Follows BLIP-2 (Li et al. 2023, https://arxiv.org/abs/2301.12597, Fig. 2 and Sec. 3.2) and the
LAVIS reference (salesforce/LAVIS, lavis/models/blip2_models/blip2_qformer.py, Qformer.py).

Built on transformers' BLIP-2 modules, which already hold what the text branch needs:
`Blip2TextEmbeddings` (word + position embeddings, queries prepended), `Blip2QFormerModel` with
``use_qformer_text_input=True`` (shared self-attention over queries + text; cross-attention to
the image on the first ``query_length`` positions only; separate feed-forward layers for query and
text positions). What transformers does not have is added here: the three masks (its Q-Former
accepts a prepared 4D mask and passes it through untouched) and the ITG language-model head
(`QFormerLMHead`, BERT's prediction head with BERT's parameter names; transformers'
`BertLMPredictionHead` is not reused because it holds a second, untied ``bias`` parameter that a
plain module never uses, which DDP rejects).

Sequence layout everywhere: ``[queries (Q) | text (T)]``, so a mask is ``[B, 1, Q+T, Q+T]``,
row = the position that attends, column = the position attended to, True = may attend.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.activations import ACT2FN
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from mllm.models.connectors.vision_positions import add_vision_positions, make_vision_positions

__all__ = [
    "QFormerLMHead",
    "QFormerWithText",
    "bidirectional_mask",
    "multimodal_causal_mask",
    "to_additive_mask",
    "unimodal_mask",
]


def _blocks(
    text_mask: torch.Tensor, num_queries: int, *, q_sees_t: bool, t_sees_q: bool, causal_text: bool
) -> torch.Tensor:
    """The [B, 1, Q+T, Q+T] boolean mask from the four blocks; padded text keys are never seen."""
    batch, t_len = text_mask.shape
    length = num_queries + t_len
    device = text_mask.device
    allowed = torch.zeros(length, length, dtype=torch.bool, device=device)
    allowed[:num_queries, :num_queries] = True  # queries always see each other
    allowed[:num_queries, num_queries:] = q_sees_t
    allowed[num_queries:, :num_queries] = t_sees_q
    text_block = torch.ones(t_len, t_len, dtype=torch.bool, device=device)
    allowed[num_queries:, num_queries:] = text_block.tril() if causal_text else text_block
    keys = torch.cat(
        [torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_mask.bool()], dim=1
    )  # [B, Q+T]: padding keys off
    return allowed[None, None] & keys[:, None, None, :]  # [B, 1, Q+T, Q+T]


def unimodal_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITC: queries see only queries, text sees only text (BLIP-2 Fig. 2, "uni-modal self-attention mask")."""
    return _blocks(text_mask, num_queries, q_sees_t=False, t_sees_q=False, causal_text=False)


def bidirectional_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITM: queries and text see each other ("bi-directional self-attention mask")."""
    return _blocks(text_mask, num_queries, q_sees_t=True, t_sees_q=True, causal_text=False)


def multimodal_causal_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITG: queries see queries only; text sees all queries and itself up to its own position
    ("multi-modal causal self-attention mask")."""
    return _blocks(text_mask, num_queries, q_sees_t=False, t_sees_q=True, causal_text=True)


def to_additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean may-attend mask -> the additive float mask eager and SDPA attention both take."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class QFormerLMHead(nn.Module):
    """BERT's LM prediction head (dense -> activation -> LayerNorm -> vocabulary), as BLIP-2's ITG uses."""

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.transform = nn.Sequential()
        self.transform.add_module("dense", nn.Linear(config.hidden_size, config.hidden_size))
        self.transform.add_module("transform_act_fn", ACT2FN[config.hidden_act])
        self.transform.add_module("LayerNorm", nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, D_q] -> [B, T, V]
        return self.decoder(self.transform(hidden))


class QFormerWithText(nn.Module):
    """Learned queries + text through one shared Q-Former, under a chosen mask.

    ``config`` is a `Blip2QFormerConfig`; ``use_qformer_text_input`` is switched on (the text
    feed-forward layers), ``vocab_size`` is the text vocabulary and ``pad_token_id`` its padding.
    The parameter names of ``query_tokens``, ``vision_positions`` and ``qformer`` match
    `QFormerConnector`, so a stage-1 Q-Former loads into the connector of stage 2 key for key.
    """

    def __init__(self, config: Blip2QFormerConfig, num_query_tokens: int) -> None:
        super().__init__()
        config.use_qformer_text_input = True
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, config.hidden_size))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.vision_positions = make_vision_positions(config)  # None unless config.num_vision_positions
        self.embeddings = Blip2TextEmbeddings(config)
        self.qformer = Blip2QFormerModel(config)
        self.lm_head = QFormerLMHead(config)  # ITG head over the text vocabulary

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def forward(
        self,
        image_embeds: torch.Tensor | None,  # [B, T_vis, D_vis]; None = text alone (no queries)
        input_ids: torch.Tensor | None = None,  # [B, T]
        text_mask: torch.Tensor | None = None,  # [B, T], 1 = real token
        allowed: torch.Tensor | None = None,  # [B, 1, L, L] boolean mask over [queries | text]
    ) -> torch.Tensor:
        """Hidden states [B, L, D_q] with L = Q + T (queries first), or T without an image."""
        # Explicit positions: the embeddings' non-persistent position_ids buffer is not restored
        # by from_pretrained (it holds whatever memory the model was materialised in).
        positions = None
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # [1, T]
        if image_embeds is None:
            embeds = self.embeddings(input_ids=input_ids, position_ids=positions)  # [B, T, D_q]
            query_length = 0
        else:
            image_embeds = add_vision_positions(image_embeds, self.vision_positions)
            queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # [B, Q, D_q]
            embeds = self.embeddings(
                input_ids=input_ids, position_ids=positions, query_embeds=queries
            )  # [B, Q+T, D_q]
            query_length = self.num_query_tokens
        if allowed is None:
            mask = text_mask if image_embeds is None else None  # 2D padding mask or nothing
        else:
            mask = to_additive_mask(allowed, embeds.dtype)
        out = self.qformer(
            query_embeds=embeds,
            query_length=query_length,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
        )
        return out.last_hidden_state
