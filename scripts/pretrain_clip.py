"""Contrastively pre-train a tiny CLIP on (image, caption) pairs and keep its vision half.

The main job uses this so that its tiny vision tower, frozen in both stages as in LLaVA, gives
features that carry colour, shape and position: a CLIP loss (Radford et al. 2021,
https://arxiv.org/abs/2103.00020) through transformers' `CLIPModel(return_loss=True)` on the
synthetic captions, with the text encoder built on the tiny LLM's tokenizer.

    python -m scripts.pretrain_clip --vision runs/tiny/clip-vision --tokenizer runs/tiny/llama \
        --data runs/data/stage1_train.json --image-folder runs/data --output runs/tiny/clip-vision
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
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

from mllm.training.checkpoint import atomic_dir

__all__ = ["pretrain_clip", "main"]


def _pairs(data_file: Path, image_folder: Path) -> list[tuple[Path, str]]:
    records = json.loads(Path(data_file).read_text(encoding="utf-8"))
    return [(image_folder / r["image"], r["conversations"][1]["value"]) for r in records]


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
) -> dict[str, float]:
    """Train a CLIP (vision tower at ``vision`` + a fresh tiny text encoder); save the vision half atomically."""
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
    pixels = {}
    for path, _ in tqdm(pairs, desc="clip: images", leave=False):
        if path not in pixels:
            with Image.open(path) as img:
                pixels[path] = image_processor(img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="clip: contrastive pre-training"):
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        texts = [caption + tokenizer.eos_token for _, caption in batch]
        tokens = tokenizer(
            texts, padding=True, truncation=True, max_length=64, add_special_tokens=False, return_tensors="pt"
        )
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=torch.stack([pixels[path] for path, _ in batch]),
            return_loss=True,
        )
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    tower = CLIPVisionModel(vision_config)
    tower.load_state_dict(model.vision_model.state_dict())
    with atomic_dir(output) as staging:  # a crash while saving leaves the previous folder intact
        tower.save_pretrained(staging)
        image_processor.save_pretrained(staging)
    tail = losses[-20:]
    return {"steps": float(steps), "first_loss": losses[0], "final_loss": sum(tail) / len(tail)}


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
    args = parser.parse_args(argv)
    stats = pretrain_clip(args.vision, args.tokenizer, args.data, args.image_folder, args.output, args.steps)
    print(
        f"pretrain_clip: {stats['steps']:.0f} steps, loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
