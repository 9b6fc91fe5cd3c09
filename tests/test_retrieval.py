"""Recall@K from a similarity matrix with several captions per image, and ITM re-ranking of the top-k."""

from __future__ import annotations

import pytest
import torch

from mllm.evaluation.retrieval import recall_at_k, rerank_top_k, retrieval_metrics

# 3 images; texts 0,1 -> image 0, texts 2,3 -> image 1, text 4 -> image 2
OWNERS = [0, 0, 1, 1, 2]
SIM = torch.tensor(
    [
        # t0   t1   t2   t3   t4
        [0.1, 0.9, 0.8, 0.0, 0.0],  # image 0: its caption t1 is first
        [0.7, 0.0, 0.2, 0.1, 0.6],  # image 1: best own caption t2 is third
        [0.5, 0.0, 0.0, 0.0, 0.4],  # image 2: t4 second
    ]
)


def test_recall_by_hand() -> None:
    m = recall_at_k(SIM, OWNERS, ks=(1, 2, 3))
    assert m["i2t_r@1"] == pytest.approx(100 / 3)
    assert m["i2t_r@2"] == pytest.approx(200 / 3)
    assert m["i2t_r@3"] == pytest.approx(100.0)
    # t2i: t0 true img0 0.1 (rank 2), t1 0.9 (0), t2 0.0 vs col [0.8,0.2,0.0] -> rank 1,
    # t3 col [0.0,0.1,0.0] -> rank 0, t4 col [0.0,0.6,0.4] -> rank 1
    assert m["t2i_r@1"] == pytest.approx(40.0)
    assert m["t2i_r@2"] == pytest.approx(80.0)
    assert m["t2i_r@3"] == pytest.approx(100.0)
    assert m["r_mean"] == pytest.approx((m["i2t_mean"] + m["t2i_mean"]) / 2)


def test_perfect_and_constant_similarity() -> None:
    owners = [i // 2 for i in range(20)]  # 10 images, 2 captions each
    perfect = torch.tensor([[1.0 if o == i else 0.0 for o in owners] for i in range(10)])
    assert all(v == 100.0 for v in recall_at_k(perfect, owners).values())
    flat = recall_at_k(torch.zeros(10, 20), owners)  # ties count against: no free hits
    assert flat["t2i_r@1"] == 0.0 and flat["i2t_r@1"] == 0.0 and flat["t2i_r@10"] == 100.0


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="names 4 texts"):
        recall_at_k(SIM, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(SIM, [0, 0, 1, 1, 3])


def test_itm_reranking_reorders_only_the_top_k() -> None:
    calls: list[int] = []

    def itm(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        owners = torch.tensor(OWNERS)
        return (owners[texts] == images).float() * 10  # an oracle matcher

    i2t, t2i = rerank_top_k(SIM, itm, k=2)
    assert calls == [3 * 2, 2 * 5]
    assert torch.isinf(i2t).sum(dim=1).tolist() == [3, 3, 3]  # only 2 candidates per image scored
    m = retrieval_metrics(SIM, OWNERS, ks=(1, 3), itm_score=itm, rerank_k=2)
    # image 1's own captions are outside its ITC top-2 (t0, t4): re-ranking cannot rescue it
    assert m["i2t_r@1"] == pytest.approx(200 / 3)
    assert m["i2t_r@3"] == pytest.approx(200 / 3)  # never ranked above the unscored texts
    plain = retrieval_metrics(SIM, OWNERS, ks=(1, 3))
    assert m["t2i_r@1"] > plain["t2i_r@1"]
