"""`train(run)`: one training stage, read as the recipe.

components (or ``init_from``) -> apply_tuning -> dataset -> collator -> MllmTrainer -> train -> save.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, set_seed

from mllm.config import RunConfig
from mllm.data.collator import MllmCollator, PackingCollator
from mllm.data.dataset import SkipReport, build_dataset
from mllm.models.adapters import apply_tuning, llm_quantization_config
from mllm.models.loading import load_model_and_processor
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor
from mllm.training.checkpoint import make_run_record, read_run_record
from mllm.training.trainer import MllmTrainer

__all__ = ["TrainResult", "load_for_training", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path  # the final output dir (mllm format)
    global_step: int  # optimizer steps done
    train_loss: float  # mean training loss over the run
    runtime_s: float  # wall-clock seconds of trainer.train()
    skipped: dict[str, int] = field(default_factory=dict)  # skipped records per reason


def _load_dtype(run: RunConfig) -> torch.dtype | None:
    # bf16 weights as LLaVA trains them; fp16 stays fp32 weights under AMP (fp16 master weights break the scaler).
    return torch.bfloat16 if run.training.bf16 else None


def load_for_training(run: RunConfig) -> tuple[nn.Module, MllmProcessor, dict[str, Any]]:
    """The untuned model, its processor and the run record: from the components, or from ``init_from``
    (a previous stage's output dir, LoRA merged: how stage 2 starts from stage 1's connector)."""
    tuning_dict = dataclasses.asdict(run.tuning)
    dtype = _load_dtype(run)
    if run.model.init_from:
        previous = read_run_record(run.model.init_from)
        if run.tuning.tune_llm == "qlora" and previous["format"] == "full":
            raise ValueError(
                f"tune_llm=qlora cannot start from the full-weight output dir `{run.model.init_from}`: "
                "QLoRA quantises the LLM of the recorded components."
            )
        model, processor = load_model_and_processor(
            run.model.init_from, dtype=dtype, merge_lora=True, quantize=run.tuning.tune_llm == "qlora"
        )
        inherited = set(previous["modified"])
        if previous["tuning"]["tune_llm"] in ("lora", "qlora"):
            inherited.add("language_model")  # its LoRA is merged in now
        if previous["tuning"]["tune_vision"] == "lora":
            inherited.add("vision_tower")
        record = make_run_record(
            vision_tower=previous["vision_tower"],
            model_name_or_path=previous["model_name_or_path"],
            tuning=tuning_dict,
            base_vocab_size=previous["base_vocab_size"],
            config=run.source,
            inherited_modified=sorted(inherited),
        )
        return model, processor, record
    vision, llm = run.model.vision_tower, run.model.model_name_or_path
    model = MllmForConditionalGeneration.from_components(
        vision,
        llm,
        quantization_config=llm_quantization_config(run.tuning),
        dtype=dtype,
        attn_implementation=run.model.attn_implementation,
        connector=run.model.connector_type,
        image_token=run.model.image_token,
        connector_depth=run.model.connector_depth,
        num_query_tokens=run.model.num_query_tokens,
        vision_feature_layer=run.model.vision_feature_layer,
        vision_feature_select_strategy=run.model.vision_feature_select_strategy,
    )
    processor = MllmProcessor.from_components(
        vision, llm, num_image_tokens=model.config.num_image_tokens, image_token=run.model.image_token
    )
    record = make_run_record(
        vision_tower=vision,
        model_name_or_path=llm,
        tuning=tuning_dict,
        base_vocab_size=AutoConfig.from_pretrained(llm).vocab_size,
        config=run.source,
    )
    return model, processor, record


def train(run: RunConfig) -> TrainResult:
    """Run one stage as configured and write the final output dir; returns what happened."""
    set_seed(run.training.seed)
    model, processor, record = load_for_training(run)
    model = apply_tuning(model, run.tuning, gradient_checkpointing=run.training.gradient_checkpointing)
    dataset = build_dataset(
        run.data.data_path,
        run.data.image_folder,
        processor,
        run.data.template,
        run.data.model_max_length,
        run.data.bad_data,
        run.data.truncation,
    )
    if run.data.packing:
        collator = PackingCollator(max_length=None)
    else:
        collator = MllmCollator(processor.tokenizer.pad_token_id)
    trainer = MllmTrainer(
        model=model,
        args=run.training,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        tuning=run.tuning,
        run_record=record,
        group_by_modality_length=run.data.group_by_modality_length,
        skip_report=SkipReport(dataset.skipped),
    )
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=run.training.resume_from_checkpoint)
    runtime = time.perf_counter() - start
    trainer.save_model(run.training.output_dir)
    trainer.save_state()
    return TrainResult(
        output_dir=Path(run.training.output_dir),
        global_step=output.global_step,
        train_loss=float(output.training_loss),
        runtime_s=runtime,
        skipped=dict(trainer.skip_report.counts),
    )
