"""`MllmTrainer`: transformers' Trainer with per-component learning rates and the mllm output-dir format."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from mllm.config import TuningArguments
from mllm.data.dataset import SkipReport
from mllm.data.sampler import ModalityLengthGroupedSampler
from mllm.io import PARTIAL, atomic_dir, remove_partials
from mllm.run_dir import RunRecord, is_run_dir, load_weights_into, save_run_dir
from mllm.training.callbacks import SKIPPED_RECORDS, GracefulStopCallback, SkippedRecordsCallback

__all__ = ["MllmTrainer", "VisionFeatureSource"]

# batch -> precomputed vision features [N_img, T_vis, D_vis] (e.g. read from a feature cache by record id)
VisionFeatureSource = Callable[[Mapping[str, Any]], torch.Tensor]


class MllmTrainer(Trainer):
    """Trainer for `MllmForConditionalGeneration` (possibly inside a peft model).

    - one optimizer group per (component, decay): ``connector_lr`` for the connector, ``vision_lr``
      for the vision tower (and its LoRA), ``learning_rate`` for the LLM and its LoRA; no weight decay
      on norms and biases (`Trainer.get_decay_parameter_names`);
    - batches may carry ``skipped`` ((reason, record id) pairs): popped before forward and counted
      in ``skip_report`` (written to ``output_dir/skipped_records.json`` at each epoch end);
    - ``group_by_modality_length`` uses `ModalityLengthGroupedSampler` over the dataset's ``lengths``
      and ``modality``; ``vision_feature_source`` replaces ``pixel_values`` by cached features;
    - every save (checkpoints and final) writes the mllm output-dir format, checkpoints atomically;
      resuming and ``load_best_model_at_end`` read it back; SIGTERM / Ctrl-C save a checkpoint and
      stop (``stop_signal`` then names the signal);
    - evaluation (``eval_dataset``) computes the loss only; skips in eval batches are not counted
      in the training report.
    """

    def __init__(
        self,
        *args: Any,
        tuning: TuningArguments,
        run_record: RunRecord | Mapping[str, Any],
        group_by_modality_length: bool = False,
        vision_feature_source: VisionFeatureSource | None = None,
        skip_report: SkipReport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tuning = tuning  # per-component modes and learning rates
        self.run_record = RunRecord.coerce(run_record)  # written as mllm_run.json at every save
        self.group_by_modality_length = group_by_modality_length
        self.vision_feature_source = vision_feature_source
        self.skip_report = skip_report if skip_report is not None else SkipReport()
        self.add_callback(SkippedRecordsCallback(self.skip_report))
        self.graceful_stop = GracefulStopCallback()
        self.add_callback(self.graceful_stop)

    @property
    def stop_signal(self) -> str | None:
        """``SIGTERM`` / ``SIGINT`` when the last `train` was stopped by that signal, else None."""
        return self.graceful_stop.requested_name

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """Trainer.train; a resumed run first takes back the skips its earlier part reported."""
        if resume_from_checkpoint:
            self.skip_report.restore(Path(self.args.output_dir) / SKIPPED_RECORDS)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # -- optimizer --------------------------------------------------------------------------
    def _component_lr(self, name: str) -> float:
        component = name.removeprefix("base_model.model.").split(".", 1)[0]
        if component == "connector" and self.tuning.connector_lr is not None:
            return self.tuning.connector_lr
        if component == "vision_tower" and self.tuning.vision_lr is not None:
            return self.tuning.vision_lr
        return self.args.learning_rate

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (or ``args.optim``) over one group per (component, decay).

        Hand-written grouping: Trainer's own create_optimizer knows only decay / no-decay groups.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[str, bool], dict[str, Any]] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            component = name.removeprefix("base_model.model.").split(".", 1)[0]
            key = (component, name in decay)
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "lr": self._component_lr(name),
                    "weight_decay": self.args.weight_decay if key[1] else 0.0,
                    "name": f"{component}/{'decay' if key[1] else 'no_decay'}",
                },
            )
            group["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)  # each group carries its own
        self.optimizer = optimizer_cls(list(groups.values()), lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # -- data -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality_length and hasattr(dataset, "lengths") and hasattr(dataset, "modality"):
            return ModalityLengthGroupedSampler(
                dataset.lengths,
                dataset.modality,
                batch_size=self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                seed=self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "skipped" not in self._signature_columns:  # keep it through remove_unused_columns
            self._signature_columns.append("skipped")

    def _prepare_batch(self, inputs: dict[str, Any], *, count_skips: bool = True) -> dict[str, Any]:
        inputs = dict(inputs)
        skipped = inputs.pop("skipped", None) or []
        if count_skips:
            self.skip_report.update(skipped)
        if self.vision_feature_source is not None and "image_features" not in inputs:
            if "pixel_values" in inputs:
                inputs["image_features"] = self.vision_feature_source(inputs)
                inputs.pop("pixel_values")
        return inputs

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None
    ) -> torch.Tensor:
        return super().training_step(model, self._prepare_batch(inputs), num_items_in_batch)

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None
    ):
        batch = self._prepare_batch(inputs, count_skips=False)
        return super().prediction_step(model, batch, prediction_loss_only, ignore_keys)

    # -- save / resume ----------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under DeepSpeed, gather the full state dict on every rank (ZeRO-3 needs all of them) and
        write the mllm format; otherwise Trainer's own path, which calls `_save`."""
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        try:
            state_dict = self.accelerator.get_state_dict(self.deepspeed)
        except ValueError as err:
            raise ValueError(
                "saving under DeepSpeed ZeRO-3 needs `stage3_gather_16bit_weights_on_model_save: true` "
                "in the DeepSpeed config."
            ) from err
        self._save(output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_run_dir(
            model, output_dir, processor=self.processing_class, record=self.run_record, state_dict=state_dict
        )

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint (weights, optimizer, scheduler, RNG, state) written into a staging dir
        and renamed into ``checkpoint-N`` only when complete: a crash mid-save keeps the previous one,
        and what a killed save left behind (``.*.partial-*``) is removed at the next save."""
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / f".{final.name}{PARTIAL}staging"
        if self.args.should_save:
            remove_partials(run_dir)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging_root)  # every rank writes into staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            raise
        finally:
            del self._get_output_dir  # back to the class's method
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = staging_root / final.name
            with atomic_dir(final) as tmp:
                tmp.rmdir()
                os.replace(staged, tmp)
            shutil.rmtree(staging_root, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(str(staging_root)):
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume weights from an mllm checkpoint (full, or trained.safetensors + adapter)."""
        if not is_run_dir(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.model if model is None else model
        load_weights_into(
            self.accelerator.unwrap_model(target, keep_torch_compile=False), resume_from_checkpoint
        )

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's weights in the mllm format (Trainer's own
        path would read only peft's adapter and miss the connector); DeepSpeed keeps its own path."""
        best = self.state.best_model_checkpoint
        if self.is_deepspeed_enabled or best is None or not is_run_dir(best):
            return super()._load_best_model()
        load_weights_into(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), best)
