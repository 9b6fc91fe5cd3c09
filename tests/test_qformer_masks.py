"""The three BLIP-2 stage-1 attention masks, asserted element by element, and that the model obeys them."""

from __future__ import annotations

import torch
from transformers import Blip2QFormerConfig

from mllm.models.connectors.qformer_text import (
    QFormerWithText,
    bidirectional_mask,
    multimodal_causal_mask,
    unimodal_mask,
)

# Q = 2 queries, T = 3 text tokens; sample 1 pads its last token.
TEXT_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _expected(rows: list[str], pad_last: bool) -> torch.Tensor:
    m = torch.tensor([[c == "1" for c in r] for r in rows])
    if pad_last:
        m[:, -1] = False
    return m


def _check(mask: torch.Tensor, rows: list[str]) -> None:
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], _expected(rows, pad_last=False))
    assert torch.equal(mask[1, 0], _expected(rows, pad_last=True))


def test_itc_unimodal_mask() -> None:
    # rows q0 q1 t0 t1 t2 ; columns the same
    _check(unimodal_mask(TEXT_MASK, 2), ["11000", "11000", "00111", "00111", "00111"])


def test_itm_bidirectional_mask() -> None:
    _check(bidirectional_mask(TEXT_MASK, 2), ["11111"] * 5)


def test_itg_multimodal_causal_mask() -> None:
    _check(multimodal_causal_mask(TEXT_MASK, 2), ["11000", "11000", "11100", "11110", "11111"])


def _tiny_qformer() -> QFormerWithText:
    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=8,
        cross_attention_frequency=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return QFormerWithText(cfg, num_query_tokens=2).eval()


def test_masks_are_obeyed_by_the_model() -> None:
    """Changing the image moves text outputs only where the mask lets text see the queries; changing a
    later text token never moves an earlier one under the causal mask, nor the queries under ITC/ITG."""
    model = _tiny_qformer()
    ids = torch.tensor([[3, 4, 5]])
    ones = torch.ones(1, 3, dtype=torch.long)
    img_a, img_b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    with torch.no_grad():
        for build, text_sees_image in ((unimodal_mask, False), (bidirectional_mask, True)):
            a = model(img_a, ids, allowed=build(ones, 2))
            b = model(img_b, ids, allowed=build(ones, 2))
            assert torch.allclose(a[:, 2:], b[:, 2:]) is (not text_sees_image)
        causal = multimodal_causal_mask(ones, 2)
        a = model(img_a, ids, allowed=causal)
        c = model(img_a, torch.tensor([[3, 4, 9]]), allowed=causal)
        assert torch.allclose(a[:, :4], c[:, :4]) and not torch.allclose(a[:, 4], c[:, 4])
        # queries under ITC equal the query-only Q-Former (text invisible to them)
        alone = model.qformer(
            query_embeds=model.query_tokens, query_length=2, encoder_hidden_states=img_a
        ).last_hidden_state
        uni = model(img_a, ids, allowed=unimodal_mask(ones, 2))
        assert torch.allclose(uni[:, :2], alone, atol=1e-5)
