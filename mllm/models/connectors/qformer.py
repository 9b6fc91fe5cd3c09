"""BLIP-2 Q-Former connector: learned queries cross-attend to vision features, then a linear map.

Follows BLIP-2 (Li et al. 2023, https://arxiv.org/abs/2301.12597) and reuses transformers'
`Blip2QFormerModel` for the attention stack instead of re-implementing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import Blip2QFormerModel

from mllm.models.connectors.registry import CONNECTORS
from mllm.models.connectors.vision_positions import add_vision_positions, make_vision_positions

if TYPE_CHECKING:
    from mllm.models.configuration_mllm import MllmConfig

__all__ = ["QFormerConnector"]


@CONNECTORS.register("qformer")
class QFormerConnector(nn.Module):
    def __init__(self, config: MllmConfig) -> None:
        super().__init__()
        qcfg = config.qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=qcfg.initializer_range)
        self.vision_positions = make_vision_positions(qcfg)  # None unless qcfg.num_vision_positions
        self.qformer = Blip2QFormerModel(qcfg)
        self.proj = nn.Linear(qcfg.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, T_vis, D_vis] -> [N, Q, D_llm]
        features = add_vision_positions(features, self.vision_positions)
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # [N, Q, D_q]
        encoder_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=encoder_mask
        )
        return self.proj(out.last_hidden_state)  # [N, Q, D_llm]
