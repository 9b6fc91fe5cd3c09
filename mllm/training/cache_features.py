"""`mllm cache-features RECIPE [key=value ...]`: encode every image of the recipe's data once with its
frozen vision tower into ``vision_feature_cache`` (see `mllm.data.feature_cache`).

recipe + overrides -> the model as training would load it (components or ``init_from``) -> the
images of ``data_path`` (and ``eval_data_path``) -> the size estimate, printed -> features written in
shards -> the cache opened and checked. An up-to-date cache only gains missing images; a stale,
partial or damaged one is rebuilt.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["build_parser", "cache_features", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm cache-features",
        description="Compute the frozen vision tower's features of every image of a recipe's data into "
        "its vision_feature_cache folder; `mllm train` with the same recipe then never runs the tower.",
    )
    parser.add_argument("recipe", help="recipe YAML (the training recipe, with vision_feature_cache: DIR)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. vision_feature_cache=runs/cache"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per tower forward (default 32)")
    return parser


def cache_features(run: Any, batch_size: int = 32, log=print):
    """Build or update the cache of ``run`` (a `RunConfig`); returns the opened `FeatureCache`."""
    import torch

    from mllm.config import ConfigError
    from mllm.data.feature_cache import build_cache, feature_key
    from mllm.data.formats import load_records
    from mllm.data.images import load_image
    from mllm.training.stages import load_for_training

    if not run.data.vision_feature_cache:
        raise ConfigError(
            "`vision_feature_cache` is not set: give the cache folder, e.g. vision_feature_cache=runs/cache."
        )
    if run.tuning.tune_vision != "frozen":
        raise ConfigError(
            f"`vision_feature_cache` needs tune_vision: frozen (got {run.tuning.tune_vision!r})."
        )
    model, processor, record = load_for_training(run)
    model.eval().requires_grad_(False)
    device = torch.device("cpu" if run.training.use_cpu or not torch.cuda.is_available() else "cuda")
    model.vision_tower.to(device)
    key = feature_key(
        model, processor.image_processor, record.vision_tower, run.data.vision_feature_cache_dtype
    )
    refs: dict[Any, None] = {}
    for path in filter(None, (run.data.data_path, run.data.eval_data_path)):
        records, _ = load_records(
            path, run.data.image_folder, run.data.bad_data, allow_symlinks=run.data.allow_symlinks
        )
        refs.update(dict.fromkeys(ref for r in records for ref in r.images))

    def load(ref: Any):
        return load_image(ref, record_id="-", source="cache-features")

    def encode(images: list) -> torch.Tensor:
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        with torch.no_grad():
            return model.vision_features(pixel_values)  # [n, T_vis, D_vis]

    probe = torch.zeros(1, 3, *_image_size(processor.image_processor), device=device)
    with torch.no_grad():
        shape = tuple(model.vision_features(probe).shape[1:])
    return build_cache(
        run.data.vision_feature_cache, key, list(refs), load, encode, shape, batch_size, log=log
    )


def _image_size(image_processor: Any) -> tuple[int, int]:
    size = (
        getattr(image_processor, "crop_size", None)
        if getattr(image_processor, "do_center_crop", False)
        else None
    )
    size = size or image_processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 0))
    return edge, edge


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm.config import build_run_config

    run = build_run_config(args.recipe, args.overrides)
    cache = cache_features(run, batch_size=args.batch_size)
    print(f"mllm cache-features: done: {len(cache)} images in `{cache.root}`")
    return 0
