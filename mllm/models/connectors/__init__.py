"""Connectors between the vision tower and the LLM, chosen by exact name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from mllm.models.connectors import linear, mlp, qformer  # noqa: F401  (each registers itself)
from mllm.models.connectors.registry import CONNECTORS

if TYPE_CHECKING:
    from mllm.models.configuration_mllm import MllmConfig

__all__ = ["CONNECTORS", "build_connector"]


def build_connector(config: MllmConfig) -> nn.Module:
    return CONNECTORS.get(config.connector_type)(config)
