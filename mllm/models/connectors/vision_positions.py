"""Learned position embeddings on the vision features a Q-Former cross-attends (optional).

A Q-Former's cross-attention treats the vision tokens as a set: which patch a feature came from is
known only as far as the tower's features carry it. A real ViT's do; a small or weakly trained
tower's may not, and then the queries cannot tell cells apart (on the tiny default, a random
Q-Former trained to report each cell's object gets 0% where the same Q-Former with these
embeddings gets 100%). Qwen-VL's resampler (Bai et al. 2023, https://arxiv.org/abs/2308.12966)
adds fixed 2D positions to the cross-attention for the same reason; learned ones, one per token,
need no grid assumption (CLS included). ``Blip2QFormerConfig.num_vision_positions`` (0 = off)
switches them on; transformers' BLIP-2 has no such field, so the attribute rides in the config.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["add_vision_positions", "make_vision_positions", "num_vision_positions"]


def num_vision_positions(qformer_config) -> int:
    """The vision tokens with a learned position embedding (0 = none) of a `Blip2QFormerConfig`."""
    return int(getattr(qformer_config, "num_vision_positions", 0) or 0)


def make_vision_positions(qformer_config) -> nn.Parameter | None:
    """[1, T_vis, D_vis] embeddings, N(0, 1) as `nn.Embedding` starts (small ones leave the queries
    blind to position for long), or None when the config has none."""
    n = num_vision_positions(qformer_config)
    if n == 0:
        return None
    return nn.Parameter(torch.randn(1, n, qformer_config.encoder_hidden_size))


def add_vision_positions(features: torch.Tensor, positions: nn.Parameter | None) -> torch.Tensor:
    """``features`` [N, T_vis, D_vis] plus their position embeddings (unchanged when there are none)."""
    if positions is None:
        return features
    if features.shape[1] != positions.shape[1]:
        raise ValueError(
            f"the Q-Former has position embeddings for {positions.shape[1]} vision tokens but got "
            f"{features.shape[1]}: the vision tower's image size, patch size or "
            "vision_feature_select_strategy differs from the one it was built for."
        )
    return features + positions.to(features.dtype)
