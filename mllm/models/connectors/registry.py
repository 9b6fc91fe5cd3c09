"""The connector registry; each connector module registers its class under an exact name."""

from __future__ import annotations

from mllm.registry import Registry

__all__ = ["CONNECTORS"]

# name -> nn.Module class with signature (config: MllmConfig) -> module mapping
# [N_img, T_vis, D_vis] vision features to [N_img, config.num_image_tokens, D_llm].
CONNECTORS: Registry[type] = Registry("connector")
