"""Linear projector (LLaVA-1.0): one matrix from vision width to LLM width."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mllm.models.connectors.registry import CONNECTORS

if TYPE_CHECKING:
    from mllm.models.configuration_mllm import MllmConfig

__all__ = ["LinearConnector"]


@CONNECTORS.register("linear")
class LinearConnector(nn.Module):
    def __init__(self, config: MllmConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, T, D_vis] -> [N, T, D_llm]
        return self.proj(features)
