"""`train(run)`: one training stage, read as the recipe.

components (or ``init_from``) -> apply_tuning -> dataset (+ eval dataset) -> collator -> MllmTrainer
-> train -> save.

``init_from`` (a previous stage's run dir) fixes the architecture: a later stage inherits the keys
in `INHERITED_KEYS` from the earlier run and may set every other key (`SETTABLE_AT_INIT_FROM` names
the model keys among them). A recipe that sets an inherited key to a different value than the
earlier run's is refused, naming both values; setting it to the same value is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, set_seed
from transformers.trainer_utils import IntervalStrategy

from mllm.config import ConfigError, RunConfig
from mllm.data.collator import MllmCollator, PackingCollator
from mllm.data.dataset import PackedDataset, SkipReport, build_dataset
from mllm.data.feature_cache import FeatureCache, feature_key
from mllm.models.adapters import apply_tuning, llm_quantization_config
from mllm.models.configuration_mllm import RECIPE_ARCHITECTURE_KEYS, MllmConfig
from mllm.models.liger import apply_liger_to_llm
from mllm.models.loading import load_model_and_processor
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor
from mllm.models.vision import vision_config_from
from mllm.run_dir import RunRecord, last_checkpoint, read_record, resolve_resume
from mllm.training.trainer import MllmTrainer

__all__ = ["INHERITED_KEYS", "SETTABLE_AT_INIT_FROM", "TrainResult", "load_for_training", "train"]

logger = logging.getLogger(__name__)

# With `init_from`, these come from the earlier run (its components and config.json): the weights
# were trained for them. A recipe may repeat them with the same value, never change them.
INHERITED_KEYS = ("vision_tower", "model_name_or_path", *RECIPE_ARCHITECTURE_KEYS)
# Model keys a later stage sets for itself (runtime choices, applied when loading); all tuning,
# data and TrainingArguments keys (tune_*, lora_*, bf16 / fp16 = the load dtype, ...) are its own too.
SETTABLE_AT_INIT_FROM = ("attn_implementation", "init_from")


@dataclass
class TrainResult:
    output_dir: Path  # the final output dir (mllm format)
    global_step: int  # optimizer steps done
    train_loss: float  # mean training loss over the run
    runtime_s: float  # wall-clock seconds of trainer.train()
    skipped: dict[str, int] = field(default_factory=dict)  # skipped records per reason
    samples_per_second: float | None = None  # samples (not packed rows) per second, all ranks together
    tokens_per_second: float | None = None  # text tokens per second (image tokens not included), all ranks
    image_tokens_per_second: float | None = None  # image-token positions per second, all ranks
    mfu: float | None = (
        None  # model FLOPs utilisation estimate; None where the device's peak is unknown (CPU)
    )
    eval_metrics: dict[str, float] = field(default_factory=dict)  # last evaluation (eval_loss, ...), if any
    interrupted: str | None = None  # SIGTERM / SIGINT when the run was stopped early
    last_checkpoint: Path | None = None  # the newest checkpoint-N in output_dir

    @property
    def exit_code(self) -> int:
        """What `mllm train` exits with: 0, or 128 + the signal number (130 Ctrl-C, 143 SIGTERM)."""
        return 0 if self.interrupted is None else 128 + int(signal.Signals[self.interrupted])


def _load_dtype(run: RunConfig) -> torch.dtype | None:
    # bf16 weights as LLaVA trains them; fp16 stays fp32 weights under AMP (fp16 master weights break the scaler).
    return torch.bfloat16 if run.training.bf16 else None


def _same_component(a: str, b: str) -> bool:
    if a == b:
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


def check_inherited(run: RunConfig, previous: RunRecord, config: MllmConfig) -> None:
    """Refuse a recipe that changes what ``init_from`` fixes (`INHERITED_KEYS`), naming both values."""
    earlier: dict[str, Any] = {
        "vision_tower": previous.vision_tower,
        "model_name_or_path": previous.model_name_or_path,
        **{key: getattr(config, key) for key in RECIPE_ARCHITECTURE_KEYS},
    }
    for key in INHERITED_KEYS:
        if key not in run.source:
            continue
        value = getattr(run.model, key)
        same = (
            _same_component(str(value), str(earlier[key]))
            if key in ("vision_tower", "model_name_or_path")
            else (value == earlier[key])
        )
        if not same:
            raise ConfigError(
                f"`{key}` is {value!r} here but {earlier[key]!r} in init_from `{run.model.init_from}`: a stage "
                f"started with init_from inherits {key}; remove it from the recipe or set it to {earlier[key]!r}."
            )


def load_for_training(run: RunConfig) -> tuple[nn.Module, MllmProcessor, RunRecord]:
    """The untuned model, its processor and the run record: from the components, or from ``init_from``
    (a previous stage's output dir, LoRA merged: how stage 2 starts from stage 1's connector)."""
    tuning_dict = dataclasses.asdict(run.tuning)
    dtype = _load_dtype(run)
    if run.model.init_from:
        from mllm.training.qformer_stage import is_stage1_dir, load_stage2_from_stage1

        if is_stage1_dir(run.model.init_from):  # BLIP-2: stage 1's Q-Former into stage 2
            return load_stage2_from_stage1(run)
        previous = read_record(run.model.init_from)
        check_inherited(run, previous, MllmConfig.from_pretrained(run.model.init_from))
        if run.tuning.tune_llm == "qlora" and previous.format == "full":
            raise ValueError(
                f"tune_llm=qlora cannot start from the full-weight output dir `{run.model.init_from}`: "
                "QLoRA quantises the LLM of the recorded components."
            )
        model, processor = load_model_and_processor(
            run.model.init_from,
            dtype=dtype,
            merge_lora=True,
            quantize=run.tuning.tune_llm == "qlora",
            attn_implementation=run.model.attn_implementation,
        )
        return model, processor, previous.continued(tuning=tuning_dict, config=run.source)
    vision, llm = run.model.vision_tower, run.model.model_name_or_path
    qformer = {}
    if run.model.connector_type == "qformer":  # a fresh Q-Former connector of the recipe's size keys
        from mllm.training.qformer_stage import recipe_qformer_config

        qformer["qformer_config"] = recipe_qformer_config(run.model, vision_config_from(vision))
    model = MllmForConditionalGeneration.from_components(
        vision,
        llm,
        quantization_config=llm_quantization_config(run.tuning),
        dtype=dtype,
        attn_implementation=run.model.attn_implementation,
        **{key: getattr(run.model, key) for key in RECIPE_ARCHITECTURE_KEYS},
        **qformer,
    )
    processor = MllmProcessor.from_components(
        vision, llm, num_image_tokens=model.config.num_image_tokens, image_token=model.config.image_token
    )
    record = RunRecord.new(
        vision_tower=vision,
        model_name_or_path=llm,
        tuning=tuning_dict,
        base_vocab_size=AutoConfig.from_pretrained(llm).vocab_size,
        config=run.source,
    )
    return model, processor, record


def open_feature_cache(run: RunConfig, model: nn.Module, processor: MllmProcessor, record: RunRecord):
    """The `FeatureCache` of ``vision_feature_cache`` built for this model's frozen tower, or None.

    Refused unless the tower is frozen (its features must not change while training); a missing,
    stale or damaged cache stops the run naming `mllm cache-features`, which builds it.
    """
    if not run.data.vision_feature_cache:
        return None
    if run.tuning.tune_vision != "frozen":
        raise ConfigError(
            f"`vision_feature_cache` needs tune_vision: frozen (got {run.tuning.tune_vision!r}): a tower that "
            "trains gives new features at every step; remove vision_feature_cache or freeze the tower."
        )
    key = feature_key(
        model, processor.image_processor, record.vision_tower, run.data.vision_feature_cache_dtype
    )
    cache = FeatureCache.open(run.data.vision_feature_cache, key)
    for module in model.modules():  # the model inside a peft wrapper too
        if isinstance(module, MllmForConditionalGeneration):
            module.vision_features_cached = True
    logger.info(
        "vision features from the cache `%s` (%d images): the tower does not run", cache.root, len(cache)
    )
    return cache


def _dataset(
    run: RunConfig, data_path: str, processor: MllmProcessor, feature_cache: FeatureCache | None = None
):
    return build_dataset(
        data_path,
        run.data.image_folder,
        processor,
        run.data.template,
        run.data.model_max_length,
        run.data.bad_data,
        run.data.truncation,
        allow_symlinks=run.data.allow_symlinks,
        feature_cache=feature_cache,
    )


def train(run: RunConfig) -> TrainResult:
    """Run one stage as configured and write the final output dir; returns what happened.

    ``eval_data_path`` gives the Trainer an eval dataset: eval loss every ``eval_steps`` under
    ``eval_strategy: steps`` (so ``load_best_model_at_end`` / ``metric_for_best_model: eval_loss``
    work), once at the end otherwise. A run stopped by SIGTERM / Ctrl-C still writes the output
    dir, marked interrupted in its record, logs where its last checkpoint is, and returns
    ``interrupted`` set (`TrainResult.exit_code` 143 / 130).
    """
    if run.model.qformer_pretrain:  # BLIP-2 stage 1: the Q-Former alone, no LLM
        from mllm.training.qformer_stage import train_stage1

        return TrainResult(**train_stage1(run))
    set_seed(run.training.seed)
    output_dir = Path(run.training.output_dir)
    resume = resolve_resume(run.training.resume_from_checkpoint, output_dir)
    model, processor, record = load_for_training(run)
    model = apply_tuning(model, run.tuning, gradient_checkpointing=run.training.gradient_checkpointing)
    if run.training.use_liger_kernel:  # the Trainer's own call finds no kernels for model type mllm
        apply_liger_to_llm(model, run.training.liger_kernel_config)
    cache = open_feature_cache(run, model, processor, record)
    dataset = _dataset(run, run.data.data_path, processor, cache)
    eval_dataset = (
        _dataset(run, run.data.eval_data_path, processor, cache) if run.data.eval_data_path else None
    )
    if run.data.packing:  # rows of whole samples up to the token budget; attention kept within each sample
        budget = run.data.packing_max_length or run.data.model_max_length
        dataset = PackedDataset(dataset, budget)
        eval_dataset = PackedDataset(eval_dataset, budget) if eval_dataset is not None else None
        logger.info(
            "packing: %d samples in %d rows of <= %d tokens (rows are shuffled; group_by_modality_length "
            "applies to unpacked samples only)",
            len(dataset.dataset),
            len(dataset),
            budget,
        )
        collator = PackingCollator(max_length=budget, pad_token_id=processor.tokenizer.pad_token_id)
    else:
        collator = MllmCollator(processor.tokenizer.pad_token_id)
    trainer = MllmTrainer(
        model=model,
        args=run.training,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        tuning=run.tuning,
        run_record=record,
        group_by_modality_length=run.data.group_by_modality_length,
        skip_report=SkipReport(dataset.skipped),
    )
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start
    stopped = trainer.stop_signal
    eval_metrics: dict[str, float] = {}
    if eval_dataset is not None and stopped is None:
        if run.training.eval_strategy == IntervalStrategy.NO:
            eval_metrics = trainer.evaluate()
            trainer.save_metrics("eval", eval_metrics)
        else:
            eval_metrics = _last_logged_eval(trainer)
    if stopped is not None:
        trainer.run_record = record.interrupted_at(stopped, trainer.state.global_step)
    trainer.save_model(str(output_dir))
    trainer.save_state()
    checkpoint = last_checkpoint(output_dir)
    if stopped is not None:
        where = f"its last checkpoint is `{checkpoint}`" if checkpoint else "it wrote no checkpoint"
        logger.warning(
            "training stopped by %s at step %d; `%s` is marked interrupted and %s. Resume by running the same "
            "command with resume_from_checkpoint=true (output_dir=%s).",
            stopped,
            trainer.state.global_step,
            output_dir,
            where,
            output_dir,
        )
    return TrainResult(
        output_dir=output_dir,
        global_step=output.global_step,
        train_loss=float(output.training_loss),
        runtime_s=runtime,
        skipped=dict(trainer.skip_report.counts),
        samples_per_second=output.metrics.get("train_samples_per_second"),
        tokens_per_second=output.metrics.get("train_tokens_per_second"),
        image_tokens_per_second=output.metrics.get("train_image_tokens_per_second"),
        mfu=output.metrics.get("train_mfu"),
        eval_metrics=eval_metrics,
        interrupted=stopped,
        last_checkpoint=checkpoint,
    )


def _last_logged_eval(trainer: MllmTrainer) -> dict[str, float]:
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            return {k: float(v) for k, v in entry.items() if k.startswith("eval_")}
    return {}
