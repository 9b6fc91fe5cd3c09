"""MLP projector (LLaVA-1.5's `mlp2x_gelu` is depth 2): Linear, then (act, Linear) x (depth - 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.activations import ACT2FN

from mllm.models.connectors.registry import CONNECTORS

if TYPE_CHECKING:
    from mllm.models.configuration_mllm import MllmConfig

__all__ = ["MlpConnector"]


@CONNECTORS.register("mlp")
class MlpConnector(nn.Module):
    def __init__(self, config: MllmConfig) -> None:
        super().__init__()
        d_vis, d_llm = config.vision_config.hidden_size, config.text_config.hidden_size
        layers: list[nn.Module] = [nn.Linear(d_vis, d_llm)]
        for _ in range(config.connector_depth - 1):
            layers += [ACT2FN[config.connector_hidden_act], nn.Linear(d_llm, d_llm)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, T, D_vis] -> [N, T, D_llm]
        return self.layers(features)
