"""Initialise the Q-Former's text side from a BERT-family checkpoint, as BLIP-2 does from BERT-base.

LAVIS (salesforce/LAVIS, lavis/models/blip2_models/blip2.py ``init_Qformer``) loads
bert-base-uncased into the Q-Former, leaves the cross-attention layers random, and copies every
text feed-forward layer into the query feed-forward layer of the same block (``*_query`` <- ``*``).
The same here, from BERT's names to transformers' `Blip2QFormerModel` names:

    embeddings.word_embeddings / position_embeddings -> qformer.embeddings.* (token-type row 0 folded
                                                        into the positions: BLIP-2 has no segments)
    embeddings.LayerNorm                             -> qformer.qformer.layernorm
    encoder.layer.N.attention.self.{query,key,value} -> qformer.qformer.encoder.layer.N.attention.attention.*
    encoder.layer.N.attention.output.*               -> ...attention.output.*
    encoder.layer.N.{intermediate,output}.*          -> ...{intermediate,output}.* and ...{intermediate,output}_query.*
    cls.predictions.transform.* / decoder            -> qformer.lm_head.* (when the checkpoint has an MLM head)

The Q-Former's vocabulary is BERT's plus [DEC] (and [CLS] if the tokenizer had none): the extra
rows stay freshly initialised. Afterwards the text-only path of the Q-Former is BERT, exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, Blip2QFormerConfig, PretrainedConfig

from mllm.models.connectors.qformer_text import QFormerWithText

__all__ = ["bert_state_dict", "init_text_from_bert", "qformer_config_from_bert"]


def qformer_config_from_bert(
    bert: PretrainedConfig, *, vocab_size: int, encoder_hidden_size: int, cross_attention_frequency: int
) -> Blip2QFormerConfig:
    """A Q-Former config of ``bert``'s size (layers, width, heads, FFN, norm eps, positions)."""
    return Blip2QFormerConfig(
        vocab_size=vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        hidden_dropout_prob=bert.hidden_dropout_prob,
        attention_probs_dropout_prob=bert.attention_probs_dropout_prob,
        max_position_embeddings=bert.max_position_embeddings,
        initializer_range=bert.initializer_range,
        layer_norm_eps=bert.layer_norm_eps,
        pad_token_id=bert.pad_token_id,
        encoder_hidden_size=encoder_hidden_size,
        cross_attention_frequency=cross_attention_frequency,
        use_qformer_text_input=True,
    )


def bert_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with any ``bert.`` prefix removed (BertModel and BertForMaskedLM alike)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in `{path}` (a BERT-family checkpoint folder is expected)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, value in load_file(str(file)).items():
            state[key.removeprefix("bert.")] = value
    return state


def init_text_from_bert(model: QFormerWithText, path: str | os.PathLike[str]) -> list[str]:
    """Copy ``path``'s BERT weights into ``model`` (see the module docstring); returns the Q-Former
    parameter names that were *not* initialised from BERT (cross-attention, extra vocabulary rows...)."""
    bert_cfg = AutoConfig.from_pretrained(str(path))
    qcfg = model.config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(bert_cfg, field) != getattr(qcfg, field):
            raise ValueError(
                f"the Q-Former's {field} is {getattr(qcfg, field)} but `{path}` has {getattr(bert_cfg, field)}: "
                "build the Q-Former with qformer_config_from_bert."
            )
    bert = bert_state_dict(path)
    target = dict(model.named_parameters())
    copied: set[str] = set()

    def put(dst: str, value: torch.Tensor) -> None:
        param = target[dst]
        with torch.no_grad():
            if param.shape == value.shape:
                param.copy_(value)
            else:  # the embedding table holds extra rows ([DEC]) beyond BERT's vocabulary
                param[: value.shape[0]].copy_(value)
        copied.add(dst)

    word = bert["embeddings.word_embeddings.weight"]
    put("embeddings.word_embeddings.weight", word)
    positions = bert["embeddings.position_embeddings.weight"]
    if "embeddings.token_type_embeddings.weight" in bert:
        positions = positions + bert["embeddings.token_type_embeddings.weight"][0]
    put("embeddings.position_embeddings.weight", positions)
    for kind in ("weight", "bias"):
        put(f"qformer.layernorm.{kind}", bert[f"embeddings.LayerNorm.{kind}"])
    for n in range(qcfg.num_hidden_layers):
        src, dst = f"encoder.layer.{n}.", f"qformer.encoder.layer.{n}."
        for kind in ("weight", "bias"):
            for proj in ("query", "key", "value"):
                put(f"{dst}attention.attention.{proj}.{kind}", bert[f"{src}attention.self.{proj}.{kind}"])
            put(f"{dst}attention.output.dense.{kind}", bert[f"{src}attention.output.dense.{kind}"])
            put(f"{dst}attention.output.LayerNorm.{kind}", bert[f"{src}attention.output.LayerNorm.{kind}"])
            for suffix in ("", "_query"):
                put(f"{dst}intermediate{suffix}.dense.{kind}", bert[f"{src}intermediate.dense.{kind}"])
                put(f"{dst}output{suffix}.dense.{kind}", bert[f"{src}output.dense.{kind}"])
                put(f"{dst}output{suffix}.LayerNorm.{kind}", bert[f"{src}output.LayerNorm.{kind}"])
    head = {
        "lm_head.transform.dense.weight": "cls.predictions.transform.dense.weight",
        "lm_head.transform.dense.bias": "cls.predictions.transform.dense.bias",
        "lm_head.transform.LayerNorm.weight": "cls.predictions.transform.LayerNorm.weight",
        "lm_head.transform.LayerNorm.bias": "cls.predictions.transform.LayerNorm.bias",
        "lm_head.decoder.bias": "cls.predictions.bias",
    }
    if all(src in bert for src in head.values()):
        for dst, src in head.items():
            put(dst, bert[src])
        put("lm_head.decoder.weight", bert.get("cls.predictions.decoder.weight", word))  # tied in BERT
    return sorted(set(target) - copied)
