"""Train BLIP-2 stage 1 on the synthetic shapes data and print held-out text->image Recall@K beside chance.

    python -m scripts.qformer_retrieval --workdir runs/qformer-retrieval [--scenes 600] [--epochs 30]

Builds the tiny components and a synthetic dataset under ``--workdir`` (offline), pre-trains the
tiny vision tower contrastively on the train split (``--tower-steps``; BLIP-2 starts from a
pre-trained, frozen tower, and the random tiny tower's features vary little between images), trains the
Q-Former alone (recipes/blip2/stage1_qformer.yaml: ITC + ITM + ITG, vision frozen, no LLM), then
scores the test split: every test image against every test caption, captions made unique per image
(an image whose caption another test image shares is left out, so a hit is never ambiguous).
Similarity = ITC (max over queries); ``--rerank K`` also re-ranks the ITC top-K by ITM as BLIP-2 does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from mllm.config import build_run_config
from mllm.evaluation.retrieval import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "blip2" / "stage1_qformer.yaml"


def unique_caption_pairs(records: list[dict]) -> list[tuple[str, str]]:
    """(image path, caption) of the records whose caption no other record has."""
    pairs = [(r["image"], r["conversations"][-1]["value"].strip()) for r in records]
    counts = Counter(caption for _, caption in pairs)
    return [(image, caption) for image, caption in pairs if counts[caption] == 1]


@torch.no_grad()
def score(run_dir: Path, data: Path, pairs: list[tuple[str, str]], rerank: int = 0) -> dict[str, float]:
    """Recall@1/5/10 of the stage-1 model in ``run_dir`` on ``pairs`` (one caption per image)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from mllm.training.qformer_stage import PairCollator, load_stage1

    model = load_stage1(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    processor = AutoImageProcessor.from_pretrained(run_dir)
    cfg = model.config
    images = processor(images=[Image.open(data / p).convert("RGB") for p, _ in pairs], return_tensors="pt")
    features = model.vision_features(images["pixel_values"])  # [N, T_vis, D_vis]
    rows = [
        {
            "pixel_values": torch.zeros(1),
            "input_ids": [cfg.cls_token_id, *tokenizer(c, add_special_tokens=False)["input_ids"]][
                : cfg.max_text_length
            ],
        }
        for _, c in pairs
    ]
    collate = PairCollator(cfg.qformer_config.pad_token_id, cfg.max_text_length)
    text = collate(rows)
    sim = model.similarity(features, text["input_ids"], text["attention_mask"])  # [N_images, N_texts]
    owners = list(range(len(pairs)))

    def itm(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        return model.itm_scores(
            features[img_idx], text["input_ids"][txt_idx], text["attention_mask"][txt_idx]
        )

    metrics = retrieval_metrics(sim, owners)
    if rerank:
        reranked = retrieval_metrics(sim, owners, itm_score=itm, rerank_k=rerank)
        metrics.update({f"itm_{k}": v for k, v in reranked.items()})
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/qformer-retrieval"))
    parser.add_argument(
        "--scenes", type=int, default=600, help="synthetic scenes (10%% become the test split)"
    )
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--contrastive-loss", choices=["infonce", "sigmoid"], default="infonce")
    parser.add_argument("--rerank", type=int, default=0, help="ITM re-ranking of the ITC top-K (0 = off)")
    parser.add_argument(
        "--tower-steps",
        type=int,
        default=300,
        help="contrastive pre-training steps of the tiny vision tower on the train split first "
        "(scripts.pretrain_clip; BLIP-2 freezes a pre-trained tower; 0 = the random tiny tower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from data_tools.synth import generate_dataset
    from mllm.training.stages import train
    from scripts.build_tiny_components import build_tiny_components

    work = args.workdir
    components = build_tiny_components(work / "tiny")
    data = work / "data"
    if not (data / "stage1_test.json").is_file():
        generate_dataset(data, num_scenes=args.scenes, seed=args.seed)
    vision = components["clip-vision"]
    if args.tower_steps:
        from scripts.pretrain_clip import pretrain_clip

        vision = work / "clip-vision-pretrained"
        if not (vision / "config.json").is_file():
            pretrain_clip(
                components["clip-vision"],
                components["llama"],
                data / "stage1_train.json",
                data,
                vision,
                steps=args.tower_steps,
                seed=args.seed,
            )
    out = work / f"stage1-{args.contrastive_loss}"
    run = build_run_config(
        RECIPE,
        [
            f"vision_tower={vision}",
            f"model_name_or_path={components['llama']}",
            f"data_path={data / 'stage1_train.json'}",
            f"image_folder={data}",
            f"output_dir={out}",
            f"num_train_epochs={args.epochs}",
            f"contrastive_loss={args.contrastive_loss}",
            f"seed={args.seed}",
            "save_strategy=no",
            "disable_tqdm=true",
        ],
    )
    start = time.perf_counter()
    result = train(run)
    train_s = time.perf_counter() - start
    pairs = unique_caption_pairs(json.loads((data / "stage1_test.json").read_text(encoding="utf-8")))
    metrics = score(out, data, pairs, rerank=args.rerank)
    n = len(pairs)
    chance = {k: 100.0 * min(k, n) / n for k in (1, 5, 10)}
    print(
        f"stage 1 ({args.contrastive_loss}): {result.global_step} steps in {train_s:.0f}s, "
        f"final loss {result.train_loss:.3f}; {n} held-out images, unique captions"
    )
    for k in (1, 5, 10):
        line = f"text->image R@{k}: {metrics[f't2i_r@{k}']:5.1f}%   image->text R@{k}: {metrics[f'i2t_r@{k}']:5.1f}%"
        if args.rerank:
            line += f"   (ITM re-ranked t2i {metrics[f'itm_t2i_r@{k}']:5.1f}%)"
        print(f"{line}   chance {chance[k]:4.1f}%")
    ratio = metrics["t2i_r@5"] / chance[5]
    print(f"text->image R@5 = {ratio:.1f}x chance")
    (out / "retrieval_metrics.json").write_text(
        json.dumps({**metrics, "chance_r@5": chance[5], "n": n}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
