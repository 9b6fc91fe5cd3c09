"""The stage-1 model: each loss contributes, every trainable parameter gets a gradient (DDP without
find_unused_parameters), both contrastive choices, save/load round trip, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Blip2QFormerConfig, CLIPVisionConfig

from mllm.config import build_run_config
from mllm.models.connectors.qformer_pretrain import (
    QFormerPretrainConfig,
    QFormerPretrainModel,
    connector_state_dict,
    is_text_ffn_key,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "blip2"


def _model(kind: str) -> QFormerPretrainModel:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    qcfg = Blip2QFormerConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=16,
        cross_attention_frequency=2,
    )
    config = QFormerPretrainConfig(
        vision_config=vision,
        qformer_config=qcfg,
        num_query_tokens=3,
        embed_dim=8,
        contrastive_loss=kind,
        cls_token_id=28,
        dec_token_id=29,
        max_text_length=6,
    )
    return QFormerPretrainModel(config)


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 28, (b, 6), generator=g)
    ids[:, 0] = 28
    mask = torch.ones(b, 6, dtype=torch.long)
    mask[0, 4:] = 0
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_every_trainable_parameter_gets_a_gradient(kind: str) -> None:
    model = _model(kind)
    model.vision_tower.requires_grad_(False)
    out = model(**_batch())
    assert torch.allclose(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    out.loss.backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert no_grad == []
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_save_load_round_trip_and_connector_weights(tmp_path: Path) -> None:
    model = _model("sigmoid").eval()
    model.save_pretrained(tmp_path)
    loaded = QFormerPretrainModel.from_pretrained(tmp_path).eval()
    assert loaded.config.contrastive_loss == "sigmoid" and loaded.config.qformer_config.use_qformer_text_input
    batch = _batch()
    with torch.no_grad():
        a = model.image_embeddings(model.vision_features(batch["pixel_values"]))
        b = loaded.image_embeddings(loaded.vision_features(batch["pixel_values"]))
        ta = model.text_embeddings(batch["input_ids"], batch["attention_mask"])
        tb = loaded.text_embeddings(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(a, b) and torch.allclose(ta, tb)
    weights = connector_state_dict(model)
    assert "query_tokens" in weights and not any(is_text_ffn_key(k) for k in weights)
    assert any(k.endswith("layer.0.intermediate_query.dense.weight") for k in weights)
    assert any(k.endswith("layer.0.attention.output.dense.weight") for k in weights)  # kept: shared attention
    assert is_text_ffn_key("qformer.encoder.layer.1.output.LayerNorm.bias")
    assert not is_text_ffn_key("qformer.encoder.layer.1.attention.output.dense.weight")


def test_shipped_blip2_recipes() -> None:
    for name in ("stage1_qformer", "vitl-opt2.7b_stage1_qformer"):
        run = build_run_config(RECIPES / f"{name}.yaml", ["use_cpu=true"])
        assert run.model.qformer_pretrain and run.model.init_from is None
        assert run.tuning.tune_vision == "frozen"
    for name, first in (("stage2_generative", "stage1_qformer"), ("vitl-opt2.7b_stage2_generative", None)):
        run = build_run_config(RECIPES / f"{name}.yaml", ["use_cpu=true"])
        assert not run.model.qformer_pretrain and run.model.connector_type == "qformer"
        assert run.tuning.tune_llm in ("frozen", "lora") and run.model.init_from
        if first:
            stage1 = build_run_config(RECIPES / f"{first}.yaml", ["use_cpu=true"])
            assert run.model.init_from == stage1.training.output_dir
    real = build_run_config(RECIPES / "vitl-opt2.7b_stage1_qformer.yaml", ["use_cpu=true"])
    assert (
        real.model.qformer_num_layers,
        real.model.qformer_hidden_size,
        real.model.qformer_cross_attention_freq,
    ) == (
        12,
        768,
        2,
    )
    assert (real.training.learning_rate, real.training.max_steps, real.training.weight_decay) == (
        1e-4,
        250000,
        0.05,
    )


def test_retrieval_features_equal_the_training_pass() -> None:
    """ITC in training runs queries and text in one pass under the unimodal mask; retrieval encodes
    images and texts apart (text alone): the features, and so the similarities, are the same."""
    model = _model("infonce").eval()
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
        features = model.vision_features(batch["pixel_values"])
        sim = model.similarity(features, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(out.image_feats, model.image_embeddings(features), atol=1e-5)
    assert torch.allclose(
        out.text_feats, model.text_embeddings(batch["input_ids"], batch["attention_mask"]), atol=1e-5
    )
    assert sim.shape == (4, 4)
    assert torch.allclose(
        sim, torch.einsum("iqd,td->itq", out.image_feats, out.text_feats).amax(-1), atol=1e-5
    )
