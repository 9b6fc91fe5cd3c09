"""Image-text retrieval metrics as pure functions: Recall@K both ways, optional ITM re-ranking.

The protocol is the one of BLIP / BLIP-2 on COCO and Flickr30K (several captions per image):
image->text counts an image as retrieved at K when any of its captions is among the K most
similar texts; text->image counts a caption when its image is among the K most similar images.
BLIP-2 re-ranks the ITC top-k (k = 128 on COCO) by the ITM score (LAVIS,
lavis/tasks/retrieval.py and blip2_qformer.compute_sim_matrix); `rerank_top_k` does the same
with any scoring callable, adding the ITM score to the ITC score of the k candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["recall_at_k", "rerank_top_k", "retrieval_metrics", "text_to_image_ranks"]

DEFAULT_KS = (1, 5, 10)


def _check(similarity: torch.Tensor, text_to_image: Sequence[int]) -> torch.Tensor:
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [N_images, N_texts], got shape {tuple(similarity.shape)}")
    owners = torch.as_tensor(list(text_to_image), dtype=torch.long)
    if owners.shape != (similarity.shape[1],):
        raise ValueError(
            f"text_to_image names {owners.numel()} texts but similarity has {similarity.shape[1]}"
        )
    if owners.numel() and (owners.min() < 0 or owners.max() >= similarity.shape[0]):
        raise ValueError(f"text_to_image holds an image index outside 0..{similarity.shape[0] - 1}")
    return owners


def text_to_image_ranks(similarity: torch.Tensor, text_to_image: Sequence[int]) -> torch.Tensor:
    """The rank of each text's own image among all images ([N_texts], 0 = first).

    Ties count against the truth (an image scoring the same as the true one ranks above it), so a
    constant similarity scores chance, not 100%, and -inf (not re-ranked) pairs never hit."""
    owners = _check(similarity, text_to_image)
    sim = similarity.float().cpu()
    true_img = sim[owners, torch.arange(sim.shape[1])]  # [N_texts]
    return (sim >= true_img[None, :]).sum(dim=0) - 1  # other images scoring at least the true one


def recall_at_k(
    similarity: torch.Tensor,  # [N_images, N_texts]
    text_to_image: Sequence[int],  # image index of each text
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """``i2t_r@K`` and ``t2i_r@K`` in percent, plus their means ``i2t_mean``, ``t2i_mean``, ``r_mean``."""
    owners = _check(similarity, text_to_image)
    sim = similarity.float().cpu()
    n_img, n_txt = sim.shape
    t2i_rank = text_to_image_ranks(sim, owners)  # [N_texts], 0 = first
    # image -> text: rank of the image's best own caption among the other images' captions
    is_own = owners[None, :] == torch.arange(n_img)[:, None]  # [N_images, N_texts]
    has_caption = is_own.any(dim=1)
    best_own = sim.masked_fill(~is_own, float("-inf")).amax(dim=1)  # [N_images]
    above = (sim > best_own[:, None]) | ((sim == best_own[:, None]) & ~is_own)
    i2t_rank = above.sum(dim=1)[has_caption]  # images without a caption are not counted
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = 100.0 * float((i2t_rank < k).float().mean()) if len(i2t_rank) else 0.0
    for k in ks:
        out[f"t2i_r@{k}"] = 100.0 * float((t2i_rank < k).float().mean()) if n_txt else 0.0
    out["i2t_mean"] = sum(out[f"i2t_r@{k}"] for k in ks) / len(ks)
    out["t2i_mean"] = sum(out[f"t2i_r@{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


def rerank_top_k(
    similarity: torch.Tensor,  # [N_images, N_texts] ITC scores
    itm_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (image idx [M], text idx [M]) -> [M]
    k: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's re-ranking: (i2t, t2i) score matrices where each row's / column's ITC top-k get
    ITC + ITM and every other pair -inf (so it ranks below every candidate)."""
    sim = similarity.float()
    n_img, n_txt = sim.shape
    i2t = torch.full_like(sim, float("-inf"))
    k_t = min(k, n_txt)
    top_t = sim.topk(k_t, dim=1).indices  # [N_images, k]
    rows = torch.arange(n_img)[:, None].expand_as(top_t)
    i2t[rows, top_t] = (
        sim[rows, top_t] + itm_score(rows.reshape(-1), top_t.reshape(-1)).reshape(top_t.shape).float()
    )
    t2i = torch.full_like(sim, float("-inf"))
    k_i = min(k, n_img)
    top_i = sim.topk(k_i, dim=0).indices  # [k, N_texts]
    cols = torch.arange(n_txt)[None, :].expand_as(top_i)
    t2i[top_i, cols] = (
        sim[top_i, cols] + itm_score(top_i.reshape(-1), cols.reshape(-1)).reshape(top_i.shape).float()
    )
    return i2t, t2i


def retrieval_metrics(
    similarity: torch.Tensor,
    text_to_image: Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    itm_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    rerank_k: int = 128,
) -> dict[str, float]:
    """Recall@K from ITC similarities, or from the ITM-re-ranked top-``rerank_k`` when ``itm_score`` is given."""
    if itm_score is None:
        return recall_at_k(similarity, text_to_image, ks)
    i2t, t2i = rerank_top_k(similarity, itm_score, rerank_k)
    i2t_metrics = recall_at_k(i2t, text_to_image, ks)
    t2i_metrics = recall_at_k(t2i, text_to_image, ks)
    out = {k: v for k, v in i2t_metrics.items() if k.startswith("i2t")}
    out.update({k: v for k, v in t2i_metrics.items() if k.startswith("t2i")})
    out["r_mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out
