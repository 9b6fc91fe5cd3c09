"""`qformer_vision_positions`: a Q-Former's cross-attention sees the vision tokens as a set, so
without position embeddings it cannot tell which patch held what; with them it can."""

from __future__ import annotations

import pytest
import torch

from mllm.config import build_run_config
from mllm.models.connectors.vision_positions import add_vision_positions


def _fresh_qformer(tiny_components, tmp_path, *keys: str):
    from mllm.training.stages import load_for_training

    run = build_run_config(
        None,
        [
            f"vision_tower={tiny_components['clip-vision']}",
            f"model_name_or_path={tiny_components['llama']}",
            "connector_type=qformer",
            "num_query_tokens=4",
            "vision_feature_select_strategy=full",
            "data_path=unused.json",
            f"output_dir={tmp_path / 'q'}",
            "use_cpu=true",
            *keys,
        ],
    )
    model, _, _ = load_for_training(run)
    return model.eval()


@pytest.mark.parametrize("positions", [False, True])
def test_queries_tell_patches_apart_only_with_positions(tiny_components, tmp_path, positions):
    model = _fresh_qformer(tiny_components, tmp_path, f"qformer_vision_positions={str(positions).lower()}")
    tokens = model.config.num_vision_tokens  # patches + CLS ("full")
    connector = model.connector
    if positions:
        assert connector.vision_positions.shape == (1, tokens, model.config.vision_config.hidden_size)
        assert model.config.qformer_config.num_vision_positions == tokens
    else:
        assert connector.vision_positions is None
    features = torch.randn(2, tokens, model.config.vision_config.hidden_size)
    swapped = features[:, [0, *range(tokens - 1, 0, -1)]]  # the same patches, in reverse order
    with torch.no_grad():
        same = torch.allclose(connector(features), connector(swapped), atol=1e-5)
    # without positions the output cannot depend on where a patch is; with them it must
    assert same is not positions


def test_a_token_count_the_positions_were_not_built_for_names_the_cause():
    positions = torch.nn.Parameter(torch.zeros(1, 10, 8))
    assert add_vision_positions(torch.ones(2, 10, 8), positions).shape == (2, 10, 8)
    assert add_vision_positions(torch.ones(2, 3, 8), None).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="10 vision tokens but got 9.*vision_feature_select_strategy"):
        add_vision_positions(torch.ones(2, 9, 8), positions)
