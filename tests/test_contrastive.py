"""ITC losses equal naive loop implementations; hard-negative mining never picks the positive."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mllm.models.losses import ContrastiveHead, gather_with_grad, itc_similarity, mine_hard_negatives


def _feats(seed: int = 0, b: int = 5, q: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, q, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    return image, text


def _naive_sim(image: torch.Tensor, text: torch.Tensor) -> list[list[float]]:
    return [
        [max(float(image[i, q] @ text[j]) for q in range(image.shape[1])) for j in range(len(text))]
        for i in range(len(image))
    ]


def test_similarity_is_max_over_queries() -> None:
    image, text = _feats()
    assert torch.allclose(itc_similarity(image, text), torch.tensor(_naive_sim(image, text)), atol=1e-6)


def test_infonce_equals_naive_clip_loss() -> None:
    image, text = _feats()
    head = ContrastiveHead("infonce")
    with torch.no_grad():
        head.log_logit_scale.fill_(math.log(7.0))
    loss, _, _ = head(image, text)
    sim = _naive_sim(image, text)
    n = len(sim)

    def ce(row: list[float], target: int) -> float:
        return -(7.0 * row[target] - math.log(sum(math.exp(7.0 * s) for s in row)))

    i2t = sum(ce(sim[i], i) for i in range(n)) / n
    t2i = sum(ce([sim[j][i] for j in range(n)], i) for i in range(n)) / n
    assert math.isclose(float(loss.detach()), (i2t + t2i) / 2, rel_tol=1e-5)


def test_sigmoid_equals_naive_siglip_loss() -> None:
    image, text = _feats(1)
    head = ContrastiveHead("sigmoid")
    assert math.isclose(float(head.logit_scale().detach()), 10.0, rel_tol=1e-6)
    assert float(head.logit_bias.detach()) == -10.0
    with torch.no_grad():
        head.log_logit_scale.fill_(math.log(3.0))
        head.logit_bias.fill_(-1.5)
    loss, _, _ = head(image, text)
    sim = _naive_sim(image, text)
    n = len(sim)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (3.0 * sim[i][j] - 1.5)))
    assert math.isclose(float(loss.detach()), total / n, rel_tol=1e-5)


def test_temperature_and_bias_learn() -> None:
    image, text = _feats(2)
    for kind in ("infonce", "sigmoid"):
        head = ContrastiveHead(kind)
        head(image, text)[0].backward()
        assert head.log_logit_scale.grad is not None and head.log_logit_scale.grad != 0
        assert (head.logit_bias.grad is not None) is (kind == "sigmoid")


def test_gather_is_identity_in_one_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_hard_negative_mining_never_picks_the_positive() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        b, n = 4, 8 if trial % 2 else 4  # also rows whose positive is off the diagonal (a rank's shard)
        sim = torch.randn(b, n, generator=g) * 20
        positives = torch.randperm(n, generator=g)[:b]
        sim[torch.arange(b), positives] = 1e4  # the positive is by far the most similar
        picked = mine_hard_negatives(sim, positives, generator=g)
        assert picked.shape == (b,) and not bool((picked == positives).any())
    # hard: the most similar negative is drawn most often
    sim = torch.tensor([[0.0, 5.0, 0.0, 0.0]]).repeat(500, 1)
    picked = mine_hard_negatives(sim, torch.zeros(500, dtype=torch.long), generator=g)
    assert (picked == 1).float().mean() > 0.9 and not bool((picked == 0).any())
