"""Contrastively pre-train a tiny CLIP on (image, caption) pairs and keep its vision half.

The main job uses this so that its tiny vision tower, frozen in both stages as in LLaVA, gives
features that carry colour, shape and position: a CLIP loss (Radford et al. 2021,
https://arxiv.org/abs/2103.00020) on the synthetic captions, with the text encoder built on the tiny
LLM's tokenizer, plus (when ``regions`` is given) a region-phrase contrastive loss in the manner of
RegionCLIP (Zhong et al. 2022, https://arxiv.org/abs/2112.09106): each object's patch tokens, at the
layer the connector reads, are matched against the phrases of all objects in the batch.

Why the region loss: a caption-level loss is satisfied by colour and position alone in most batches,
so the tower's patch tokens keep shape faint (4% of their variance in the main job's tower, against
71% for colour), and a tiny LLM cannot pick it out of one object among several; with the region loss
shape is 17% of the variance and the main job's stage 2 answers shape questions instead of guessing.

    python -m scripts.pretrain_clip --vision runs/tiny/clip-vision --tokenizer runs/tiny/llama \
        --data runs/data/stage1_train.json --image-folder runs/data --output runs/tiny/clip-vision \
        [--regions runs/data/scenes.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from mllm.io import atomic_dir

__all__ = ["load_regions", "main", "pretrain_clip"]


def _pairs(data_file: Path, image_folder: Path) -> list[tuple[Path, str]]:
    records = json.loads(Path(data_file).read_text(encoding="utf-8"))
    return [(image_folder / r["image"], r["conversations"][1]["value"]) for r in records]


# one object of an image: the indices of the patch tokens it covers (CLS not counted) and its phrase
Region = tuple[tuple[int, ...], str]


def load_regions(scenes_file: Path, image_folder: Path, patch_grid: int) -> dict[Path, list[Region]]:
    """Objects per image from `data_tools.synth`'s ``scenes.jsonl``: the patches of each object's
    cell of the 3x3 scene grid on a ``patch_grid`` x ``patch_grid`` patch grid, and its phrase."""
    if patch_grid % 3:
        raise ValueError(
            f"region pre-training needs the tower's patch grid to split into the scene's 3x3 cells, "
            f"got {patch_grid}x{patch_grid} patches (image_size / patch_size must be a multiple of 3)"
        )
    per_cell = patch_grid // 3
    regions: dict[Path, list[Region]] = {}
    for n, line in enumerate(Path(scenes_file).read_text(encoding="utf-8").splitlines(), 1):
        try:
            scene = json.loads(line)
            objects = [(int(s["cell"]), f"a {s['size']} {s['color']} {s['shape']}") for s in scene["shapes"]]
            image = image_folder / scene["image"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{scenes_file}, line {n}: not a synth scene row ({err!r})") from err
        regions[image] = []
        for cell, phrase in objects:
            row, col = divmod(cell, 3)
            patches = tuple(
                (row * per_cell + r) * patch_grid + col * per_cell + c
                for r in range(per_cell)
                for c in range(per_cell)
            )
            regions[image].append((patches, phrase))
    return regions


def _region_loss(
    model: CLIPModel,
    patch_tokens: torch.Tensor,
    batch_regions: list[list[Region]],
    encode_text: Callable[[list[str]], torch.Tensor],
) -> torch.Tensor:
    """Cross-entropy of each object's pooled patch tokens against the batch's distinct phrases."""
    pooled, targets, phrases = [], [], sorted({phrase for regions in batch_regions for _, phrase in regions})
    for image_tokens, regions in zip(patch_tokens, batch_regions):
        for patches, phrase in regions:
            pooled.append(image_tokens[list(patches)].mean(0))
            targets.append(phrases.index(phrase))  # equal phrases are one class, never a negative
    region = F.normalize(
        model.visual_projection(model.vision_model.post_layernorm(torch.stack(pooled))), dim=-1
    )
    logits = model.logit_scale.exp() * region @ encode_text(phrases).t()
    return F.cross_entropy(logits, torch.tensor(targets))


def pretrain_clip(
    vision: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    data_file: Path,
    image_folder: Path,
    output: str | os.PathLike,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    regions: Path | None = None,
    feature_layer: int = -2,
    region_weight: float = 1.0,
) -> dict[str, float]:
    """Train a CLIP (vision tower at ``vision`` + a fresh tiny text encoder); save the vision half atomically.

    ``regions``: a synth ``scenes.jsonl``; its objects add the region-phrase loss (weight
    ``region_weight``) on the patch tokens of ``feature_layer`` (the layer the connector reads).
    Only images of ``data_file`` are trained on, so held-out scenes in the same file are never seen.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vision_config = CLIPVisionConfig.from_pretrained(vision)
    image_processor = AutoImageProcessor.from_pretrained(vision, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=vision_config.hidden_size,
        intermediate_size=vision_config.intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=vision_config.num_attention_heads,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=vision_config.hidden_size,
    )
    model = CLIPModel(config)
    model.vision_model.load_state_dict(
        CLIPVisionModel.from_pretrained(vision).state_dict()
    )  # a CLIPVisionModel
    pairs = _pairs(data_file, image_folder)
    grid = vision_config.image_size // vision_config.patch_size
    objects = load_regions(regions, image_folder, grid) if regions is not None else None
    if objects is not None:
        missing = sorted({str(path) for path, _ in pairs if path not in objects})
        if missing:
            raise ValueError(
                f"{regions} has no scene for {len(missing)} training image(s), e.g. {missing[0]}"
            )
    pixels = {}
    for path, _ in tqdm(pairs, desc="clip: images", leave=False):
        if path not in pixels:
            with Image.open(path) as img:
                pixels[path] = image_processor(img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1
    )

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenizer(
            [text + tokenizer.eos_token for text in texts],
            padding=True,
            truncation=True,
            max_length=64,
            add_special_tokens=False,
            return_tensors="pt",
        )

    def encode_text(texts: list[str]) -> torch.Tensor:
        features = model.get_text_features(**tokenize(texts))
        return F.normalize(features.pooler_output, dim=-1)

    model.train()
    losses, region_losses = [], []
    for _ in tqdm(range(steps), desc="clip: contrastive pre-training"):
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        out = model(
            **tokenize([caption for _, caption in batch]),
            pixel_values=torch.stack([pixels[path] for path, _ in batch]),
            return_loss=True,
            output_hidden_states=True,  # the region loss reads the patch tokens of `feature_layer`
        )
        loss = out.loss
        if objects is not None:
            patch_tokens = out.vision_model_output.hidden_states[feature_layer][:, 1:]
            region = _region_loss(model, patch_tokens, [objects[path] for path, _ in batch], encode_text)
            loss = loss + region_weight * region
            region_losses.append(region.item())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    tower = CLIPVisionModel(vision_config)
    tower.load_state_dict(model.vision_model.state_dict())
    with atomic_dir(output) as staging:  # a crash while saving leaves the previous folder intact
        tower.save_pretrained(staging)
        image_processor.save_pretrained(staging)
    tail = losses[-20:]
    stats = {"steps": float(steps), "first_loss": losses[0], "final_loss": sum(tail) / len(tail)}
    if region_losses:
        stats["first_region_loss"] = region_losses[0]
        stats["final_region_loss"] = sum(region_losses[-20:]) / len(region_losses[-20:])
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vision", required=True, help="a CLIP vision tower folder")
    parser.add_argument("--tokenizer", required=True, help="tokenizer for the text encoder")
    parser.add_argument("--data", required=True, type=Path, help="stage-1 LLaVA json (image, caption)")
    parser.add_argument("--image-folder", required=True, type=Path)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--regions",
        type=Path,
        default=None,
        help="synth scenes.jsonl: adds the region-phrase loss on patch tokens",
    )
    parser.add_argument(
        "--feature-layer",
        type=int,
        default=-2,
        help="hidden-state layer the region loss shapes (the connector's)",
    )
    args = parser.parse_args(argv)
    stats = pretrain_clip(
        args.vision,
        args.tokenizer,
        args.data,
        args.image_folder,
        args.output,
        args.steps,
        regions=args.regions,
        feature_layer=args.feature_layer,
    )
    print(
        f"pretrain_clip: {stats['steps']:.0f} steps, loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
