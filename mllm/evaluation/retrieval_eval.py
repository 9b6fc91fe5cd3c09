"""`mllm eval MODEL --task retrieval`: image->text and text->image Recall@1/5/10.

``MODEL`` is either

- a BLIP-2 stage-1 output dir (`mllm train` with ``qformer_pretrain: true``): similarity = ITC, the
  best of the Q-Former's query embeddings against the caption's [CLS] embedding; ``rerank`` K also
  re-ranks the ITC top-K of each image and each caption by ITM, as BLIP-2 does (K = 128 on COCO); or
- a dual encoder with a text half, saved by transformers (CLIP, SigLIP: anything whose model has
  ``get_image_features`` and ``get_text_features``, e.g. ``openai/clip-vit-large-patch14-336``):
  similarity = cosine of the two projections, so a tower is checked before a run uses it.

Data: what ``--task caption`` reads (COCO ``images`` + ``annotations``, rows with ``image`` and
``captions``, or training records; records sharing an ``id`` are one image with all their
captions). Every image is ranked against every caption. A missing or unreadable image skips its
captions too and is counted (``strict`` stops at the first). Written into the output folder:
``metrics.json`` (Recall@K both ways, their means, chance for each K, counts) and
``predictions.jsonl`` (one row per caption: its image, the true image's rank, the top-5 images).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm.evaluation.retrieval import DEFAULT_KS, retrieval_metrics, text_to_image_ranks

__all__ = ["RETRIEVAL_TASK", "DualEncoderScorer", "QFormerScorer", "evaluate_retrieval", "load_scorer"]

logger = logging.getLogger(__name__)

RETRIEVAL_TASK = "retrieval"


@dataclass
class Encoded:
    """What a scorer encoded of the images (kept for ITM re-ranking) and of the captions."""

    images: Any
    texts: Any


class QFormerScorer:
    """ITC (and ITM) of a BLIP-2 stage-1 model."""

    kind = "blip2-qformer"

    def __init__(self, path: str | os.PathLike[str], device: str | None = None) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        from mllm.training.qformer_stage import load_stage1

        self.model = load_stage1(path).eval().to(device or "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: list[Any]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model.vision_features(pixels.to(self.device))  # [B, T_vis, D_vis]

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The captions as stage 1 trained on them: [CLS] + tokens, padded to ``max_text_length``."""
        from mllm.training.qformer_stage import caption_input_ids, pad_captions

        cfg = self.model.config
        ids, mask = pad_captions(
            [caption_input_ids(self.tokenizer, c, cfg.cls_token_id, cfg.max_text_length) for c in captions],
            cfg.qformer_config.pad_token_id,
            cfg.max_text_length,
        )
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    @torch.no_grad()
    def similarity(self, encoded: Encoded, batch_size: int) -> torch.Tensor:
        from mllm.models.losses import itc_similarity

        image_emb = torch.cat(
            [self.model.image_embeddings(f) for f in encoded.images.split(batch_size)]
        )  # [N_i, Q, E]
        ids, mask = encoded.texts["input_ids"], encoded.texts["attention_mask"]
        text_emb = torch.cat(
            [self.model.text_embeddings(i, m) for i, m in zip(ids.split(batch_size), mask.split(batch_size))]
        )  # [N_t, E]
        return itc_similarity(image_emb, text_emb).float().cpu()

    def itm(self, encoded: Encoded, batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        ids, mask = encoded.texts["input_ids"], encoded.texts["attention_mask"]

        @torch.no_grad()
        def score(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            out = []
            for i, t in zip(image_idx.split(batch_size), text_idx.split(batch_size)):
                out.append(self.model.itm_scores(encoded.images[i], ids[t], mask[t]).float().cpu())
            return torch.cat(out) if out else torch.zeros(0)

        return score


class DualEncoderScorer:
    """Cosine similarity of a CLIP / SigLIP model's image and text projections."""

    kind = "dual-encoder"

    def __init__(self, path: str | os.PathLike[str], device: str | None = None) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path).eval().to(device or "cpu")
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(
                f"{path}: a {type(self.model).__name__} has no text half (get_text_features); retrieval "
                "scores a BLIP-2 stage-1 run dir (qformer_pretrain: true) or a CLIP / SigLIP dual encoder."
            )
        # the two halves' own processors (a saved CLIPProcessor / SiglipProcessor holds both)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        # SigLIP was trained on texts padded to max_length (64): its text tower expects that padding.
        self.padding: bool | str = "max_length" if "siglip" in self.model.config.model_type else True
        self.device = next(self.model.parameters()).device

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: list[Any]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self._features(self.model.get_image_features(pixel_values=pixels))  # [B, E]

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        inputs = self.tokenizer(captions, padding=self.padding, truncation=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return self._features(self.model.get_text_features(**inputs))  # [B, E]

    def similarity(self, encoded: Encoded, batch_size: int) -> torch.Tensor:
        return (encoded.images @ encoded.texts.T).cpu()


def load_scorer(path: str | os.PathLike[str], device: str | None = None) -> QFormerScorer | DualEncoderScorer:
    """The scorer ``path`` holds: a BLIP-2 stage-1 run dir, else a CLIP / SigLIP dual encoder."""
    from mllm.training.qformer_stage import is_stage1_dir

    if is_stage1_dir(path):
        return QFormerScorer(path, device)
    local = Path(path)
    if local.is_dir() and (local / "mllm_run.json").is_file():
        raise ValueError(
            f"{path} is an mllm run whose model generates text and has no retrieval head; --task retrieval "
            "scores a BLIP-2 stage-1 run dir (qformer_pretrain: true) or a CLIP / SigLIP dual encoder."
        )
    return DualEncoderScorer(path, device)


def _encode_in_batches(
    fn: Callable[[list[Any]], Any], items: Sequence[Any], batch_size: int, desc: str
) -> Any:
    from tqdm.auto import tqdm

    parts = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        parts.append(fn(list(items[start : start + batch_size])))
    if not parts:
        raise ValueError("nothing to encode: the data holds no readable image with a caption.")
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def evaluate_retrieval(
    model_path: str | os.PathLike[str],
    data: str,
    output: str | os.PathLike[str] | None = None,
    *,
    image_folder: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    rerank: int = 0,
    strict: bool = False,
    device: str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Recall@K both ways of the model in ``model_path`` on ``data``; writes ``metrics.json`` and
    ``predictions.jsonl`` into ``output`` (default ``MODEL/eval/retrieval``) and returns the metrics."""
    from mllm.data.errors import BadRecordError
    from mllm.data.formats import save_json, save_jsonl
    from mllm.data.images import load_image
    from mllm.evaluation.tasks.caption import load_caption_samples

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if rerank < 0:
        raise ValueError(f"rerank must be >= 0 (0 = ITC only), got {rerank}.")
    samples = load_caption_samples(data, image_folder, limit)
    scorer = load_scorer(model_path, device)
    if rerank and not isinstance(scorer, QFormerScorer):
        raise ValueError("ITM re-ranking needs a BLIP-2 stage-1 model; a dual encoder has no ITM head.")
    output = Path(output) if output is not None else Path(model_path) / "eval" / RETRIEVAL_TASK

    kept, images, skipped = [], [], []
    for sample in samples:
        try:
            if len(sample.images) != 1:
                raise BadRecordError(
                    "image_count_mismatch",
                    sample.id,
                    sample.source,
                    f"retrieval needs one image, got {len(sample.images)}",
                )
            images.append(load_image(sample.images[0], record_id=sample.id, source=sample.source))
            kept.append(sample)
        except BadRecordError as err:
            if strict:
                raise
            skipped.append({"id": sample.id, "reason": err.reason, "detail": str(err)})
            logger.warning("skipped image %s: %s", sample.id, err)
    captions = [c for s in kept for c in s.references]
    owners = [i for i, s in enumerate(kept) for _ in s.references]
    encoded = Encoded(
        _encode_in_batches(scorer.encode_images, images, batch_size, "retrieval: images"),
        _encode_in_batches(scorer.encode_texts, captions, batch_size, "retrieval: captions"),
    )
    for image in images:
        image.close()
    sim = scorer.similarity(encoded, batch_size)  # [N_images, N_texts]
    metrics: dict[str, Any] = dict(retrieval_metrics(sim, owners, ks))
    if rerank:
        reranked = retrieval_metrics(
            sim, owners, ks, itm_score=scorer.itm(encoded, batch_size), rerank_k=rerank
        )
        metrics.update({f"itm_{k}": v for k, v in reranked.items()})
    n_img, n_txt = sim.shape
    own_captions = Counter(owners)  # captions of each kept image
    for k in ks:
        # a random ranking: P(the true image in the top K) and P(any of an image's captions in the top K)
        metrics[f"chance_t2i_r@{k}"] = 100.0 * min(k, n_img) / n_img
        metrics[f"chance_i2t_r@{k}"] = (
            100.0 * sum(_chance_any(n_txt, c, k) for c in own_captions.values()) / n_img
        )
    metrics.update(
        scorer=scorer.kind, num_images=n_img, num_captions=n_txt, rerank_k=rerank, num_skipped=len(skipped)
    )
    if skipped:
        metrics.update(skipped=dict(Counter(s["reason"] for s in skipped)), skipped_images=skipped)
    t2i_rank = text_to_image_ranks(sim, owners)  # as Recall@K counts it (ties against the truth)
    top = sim.topk(min(5, n_img), dim=0).indices.T  # [N_texts, 5]
    rows = [
        {
            "id": f"{kept[owners[j]].id}#{j}",
            "caption": captions[j],
            "image_id": kept[owners[j]].id,
            "t2i_rank": int(t2i_rank[j]),
            "top_images": [kept[int(i)].id for i in top[j]],
        }
        for j in range(n_txt)
    ]
    output.mkdir(parents=True, exist_ok=True)
    save_jsonl(rows, output / "predictions.jsonl")
    save_json(metrics, output / "metrics.json")
    return metrics


def _chance_any(n_texts: int, own: int, k: int) -> float:
    """P(at least one of ``own`` captions among ``k`` drawn at random from ``n_texts``)."""
    from math import comb

    if own <= 0 or n_texts <= 0:
        return 0.0
    k = min(k, n_texts)
    return 1.0 - comb(n_texts - own, k) / comb(n_texts, k)
