"""Stage-1 Q-Former losses: ITC (InfoNCE or sigmoid), ITM hard-negative mining, ITG, cross-rank gathering.

- InfoNCE: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020, Fig. 3): symmetric
  cross-entropy over the similarity matrix scaled by a learnable ``logit_scale`` (= 1/temperature,
  stored as its log, initialised to log(1/0.07), clamped at 100).
- Sigmoid: SigLIP (Zhai et al. 2023, https://arxiv.org/abs/2303.15343, Algorithm 1): a binary
  loss on every image-text pair, ``-log sigmoid(z_ij * (t * s_ij + b))`` summed and divided by the
  batch size, with learnable ``t = exp(t')`` (t' = log 10) and ``b`` (= -10).
- ITC similarity of an image and a text = max over the image's query embeddings (BLIP-2 Sec. 3.2).
- ITM hard negatives: for each text an image, for each image a text, sampled with probability
  softmax(similarity) over the (gathered) batch, the positive excluded (LAVIS blip2_qformer.py).

Under DDP each rank computes its local rows against the gathered columns. `gather_with_grad` is
an all_gather whose backward all-reduces the gradient and hands each rank its own shard's part
(LAVIS' ``GatherLayer``, lavis/models/base_model.py): a sample's gradient from the other ranks' rows
reaches it too, so the DDP-averaged gradient equals the single-process gradient of the whole
batch's loss (tests/test_contrastive_ddp.py). LAVIS' BLIP-2 ITC gathers without gradient
(``concat_all_gather``), which drops those terms. In a single process it is the identity.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ContrastiveHead",
    "gather_with_grad",
    "gathered_offset",
    "infonce_loss",
    "itc_similarity",
    "mine_hard_negatives",
    "sigmoid_loss",
]

ContrastiveKind = Literal["infonce", "sigmoid"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherLayer(torch.autograd.Function):
    """all_gather forward; backward: sum the gradients of all ranks, keep this rank's shard."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, x.contiguous())
        return tuple(shards)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)  # [world, B, ...]
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each rank -> [world * B, ...] in rank order, differentiable across ranks."""
    if not _distributed():
        return x
    if not x.requires_grad:
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards, dim=0)
    return torch.cat(_GatherLayer.apply(x), dim=0)


def gathered_offset(local_batch: int) -> int:
    """Row of this rank's first sample in a gathered batch (0 in a single process)."""
    return dist.get_rank() * local_batch if _distributed() else 0


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Image query embeddings [N_i, Q, D] and text embeddings [N_t, D] -> [N_i, N_t], max over Q."""
    return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)


def infonce_loss(
    sim_i2t: torch.Tensor,  # [B, N]: local images vs all texts
    sim_t2i: torch.Tensor,  # [B, N]: local texts vs all images
    targets: torch.Tensor,  # [B]: column of each local sample's positive
    logit_scale: torch.Tensor,  # scalar: 1 / temperature
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: mean of the image->text and text->image cross-entropies."""
    loss_i2t = F.cross_entropy(sim_i2t * logit_scale, targets, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(sim_t2i * logit_scale, targets, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2


def sigmoid_loss(
    sim_i2t: torch.Tensor,  # [B, N]: local images vs all texts
    targets: torch.Tensor,  # [B]
    logit_scale: torch.Tensor,  # scalar t
    logit_bias: torch.Tensor,  # scalar b
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over the local rows (summed over ranks it covers every pair once)."""
    logits = sim_i2t * logit_scale + logit_bias  # [B, N]
    labels = -torch.ones_like(logits)
    labels[torch.arange(len(targets), device=logits.device), targets] = 1.0
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


class ContrastiveHead(nn.Module):
    """The learnable temperature (and SigLIP's bias) of the ITC loss; ``forward`` gives the loss."""

    def __init__(self, kind: ContrastiveKind = "infonce", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in ("infonce", "sigmoid"):
            raise ValueError(f"contrastive loss `{kind}` is not supported; choose infonce or sigmoid.")
        self.kind = kind
        self.label_smoothing = label_smoothing
        init_scale = math.log(1 / 0.07) if kind == "infonce" else math.log(10.0)
        self.log_logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0 if kind == "sigmoid" else 0.0))
        self.logit_bias.requires_grad_(kind == "sigmoid")

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)

    def forward(
        self, image_feats: torch.Tensor, text_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local normalised [B, Q, D] and [B, D] -> (loss, sim_i2t [B, N], sim_t2i [B, N]), N = world * B.

        The similarities are returned (unscaled) for hard-negative mining."""
        all_images = gather_with_grad(image_feats)  # [N, Q, D]
        all_texts = gather_with_grad(text_feats)  # [N, D]
        sim_i2t = itc_similarity(image_feats, all_texts)  # [B, N]
        sim_t2i = itc_similarity(all_images, text_feats).t()  # [B, N]
        batch = image_feats.shape[0]
        offset = gathered_offset(batch)
        targets = torch.arange(offset, offset + batch, device=image_feats.device)
        if self.kind == "infonce":
            loss = infonce_loss(sim_i2t, sim_t2i, targets, self.logit_scale(), self.label_smoothing)
        else:
            loss = sigmoid_loss(sim_i2t, targets, self.logit_scale(), self.logit_bias)
        return loss, sim_i2t, sim_t2i


def mine_hard_negatives(
    sim: torch.Tensor,  # [B, N]: each local row's similarity to every gathered candidate
    positives: torch.Tensor,  # [B]: the column of each row's positive
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One negative column per row, drawn with probability softmax(sim) over every column but the positive."""
    if sim.shape[1] < 2:
        raise ValueError("hard-negative mining needs at least two candidates in the (gathered) batch.")
    with torch.no_grad():
        logits = sim.float().clone()
        logits[torch.arange(sim.shape[0], device=sim.device), positives] = float("-inf")
        weights = logits.softmax(dim=1)  # the positive's weight is exactly 0
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)
