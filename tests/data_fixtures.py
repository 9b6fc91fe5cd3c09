"""Helpers shared by the data-layer tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from mllm.data.formats import Record, Turn
from mllm.models.processing_mllm import MllmProcessor

NUM_IMAGE_TOKENS = 16  # the tiny clip tower: (32 / 8)^2 patches, CLS dropped


def make_processor(
    components: dict[str, Path], llm: str, num_image_tokens: int = NUM_IMAGE_TOKENS
) -> MllmProcessor:
    return MllmProcessor.from_components(
        str(components["clip-vision"]), str(components[llm]), num_image_tokens=num_image_tokens
    )


def image(color: tuple[int, int, int] = (255, 0, 0), size: int = 40) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def record(rid: str, *pairs: tuple[str, str], images: tuple = (), system: str | None = None) -> Record:
    """A record from (user, assistant) pairs."""
    turns = [Turn("system", system)] if system else []
    for user, assistant in pairs:
        turns += [Turn("user", user), Turn("assistant", assistant)]
    return Record(rid, tuple(turns), tuple(images), f"test.json#{rid}")


def save_tiny_lora_run(
    components: dict[str, Path], out: Path, llm: str = "llama", config: Mapping[str, Any] | None = None
) -> Path:
    """A tiny LoRA run (clip + ``llm``, mlp connector, r 4) saved as `mllm train` saves it;
    ``config`` is the recipe mapping its record carries (``template``, ``model_max_length``, ...)."""
    import torch
    from transformers import AutoConfig

    from mllm.config import TuningArguments
    from mllm.models.adapters import apply_tuning
    from mllm.models.modeling_mllm import MllmForConditionalGeneration
    from mllm.run_dir import RunRecord, save_run_dir

    vision, language = str(components["clip-vision"]), str(components[llm])
    tuning = TuningArguments(tune_llm="lora", lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    model = apply_tuning(
        MllmForConditionalGeneration.from_components(vision, language, connector="mlp"), tuning
    )
    processor = MllmProcessor.from_components(vision, language, model.config.num_image_tokens)
    record = RunRecord.new(
        vision_tower=vision,
        model_name_or_path=language,
        tuning=dataclasses.asdict(tuning),
        base_vocab_size=AutoConfig.from_pretrained(language).vocab_size,
        config=config,
    )
    return save_run_dir(model, out, processor=processor, record=record)


def train_tiny_full_run(components: dict[str, Path], data_path: Path, out: Path, max_steps: int) -> Path:
    """`mllm train key=value ...` (no recipe) on ``data_path``: the tiny clip + llama components, the
    LLM fully tuned at a constant 2e-3 for ``max_steps`` steps of 8, saved in ``out``."""
    from mllm.config import build_run_config
    from mllm.training.stages import train

    overrides = [
        f"vision_tower={components['clip-vision']}",
        f"model_name_or_path={components['llama']}",
        f"data_path={data_path}",
        f"output_dir={out}",
        "tune_llm=full",
        f"max_steps={max_steps}",
        "per_device_train_batch_size=8",
        "learning_rate=2e-3",
        "lr_scheduler_type=constant",
        "save_steps=1000",
        "use_cpu=true",
        "disable_tqdm=true",
        "report_to=none",
    ]
    train(build_run_config(None, overrides))
    return out
