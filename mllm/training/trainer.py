"""`MllmTrainer`: transformers' Trainer with per-component learning rates and the mllm output-dir format."""

from __future__ import annotations

import os
import shutil
import time
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

__all__ = ["BATCH_STATS", "CountingCollator", "MllmTrainer", "VisionFeatureSource", "device_peak_flops"]

# batch -> precomputed vision features [N_img, T_vis, D_vis] (e.g. read from a feature cache by record id)
VisionFeatureSource = Callable[[Mapping[str, Any]], torch.Tensor]

BATCH_STATS = "mllm_batch_stats"  # batch key: [samples, text tokens, image tokens], popped before forward

# dense bf16 / fp16 peak FLOP/s of one device by name (vendor datasheets, no sparsity); MFU only for these
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense half-precision peak FLOP/s when known (CUDA by name), else None (CPU: None)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_FLOPS.items() if key in name), None)


class CountingCollator:
    """Wraps a collator and adds ``BATCH_STATS`` (samples, text tokens, image tokens) to each batch,
    counted on the samples themselves, so packed rows and padding count what they hold. Runs in the
    DataLoader workers with the collator (the counts travel in the batch)."""

    def __init__(self, collator: Callable[[Any], dict[str, Any]], image_token_id: int) -> None:
        self.collator = collator
        self.image_token_id = image_token_id

    def __call__(self, batch: Any) -> dict[str, Any]:
        out = self.collator(batch)
        samples = [s for item in batch for s in (item if isinstance(item, (list, tuple)) else [item])]
        tokens = sum(len(s["input_ids"]) for s in samples)
        images = sum(int((torch.as_tensor(s["input_ids"]) == self.image_token_id).sum()) for s in samples)
        out[BATCH_STATS] = torch.tensor([len(samples), tokens - images, images], dtype=torch.float64)
        return out


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
        image_token_id = getattr(
            getattr(self.processing_class, "tokenizer", None), "convert_tokens_to_ids", None
        )
        token = getattr(self.processing_class, "image_token", None)
        if self.data_collator is not None and callable(image_token_id) and token is not None:
            self.data_collator = CountingCollator(self.data_collator, int(image_token_id(token)))
        self.throughput = torch.zeros(
            3, dtype=torch.float64
        )  # this rank's samples, text tokens, image tokens
        self._last_log: tuple[float, torch.Tensor] | None = (
            None  # (time, totals of all ranks) at the last log
        )

    @property
    def stop_signal(self) -> str | None:
        """``SIGTERM`` / ``SIGINT`` when the last `train` was stopped by that signal, else None."""
        return self.graceful_stop.requested_name

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """Trainer.train; a resumed run first takes back the skips its earlier part reported."""
        if resume_from_checkpoint:
            self.skip_report.restore(Path(self.args.output_dir) / SKIPPED_RECORDS)
        self.throughput.zero_()
        self._last_log = (time.perf_counter(), torch.zeros(3, dtype=torch.float64))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # -- telemetry --------------------------------------------------------------------------
    def _all_ranks_throughput(self) -> torch.Tensor:
        """[samples, text tokens, image tokens] summed over ranks (a collective: every rank calls it)."""
        return self.accelerator.reduce(self.throughput.to(self.args.device), reduction="sum").cpu()

    def _model_flops_per_token(self) -> tuple[float, float]:
        """(FLOPs per text token, FLOPs per image token) of one training step: 6 N for trained parts,
        2 N (forward) + 2 N (backward through activations) for frozen ones the gradient passes, the tower's
        forward share once per image token when it runs. A rough figure for MFU, not a profiler's."""
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model

        def count(module: nn.Module | None) -> tuple[int, int]:
            params = list(module.parameters()) if module is not None else []
            return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

        llm_all, llm_trained = count(getattr(base, "language_model", None))
        conn_all, conn_trained = count(getattr(base, "connector", None))
        vis_all, vis_trained = count(getattr(base, "vision_tower", None))
        llm = 4 * llm_all + 2 * llm_trained  # forward + activation grads + weight grads of what trains
        connector = 4 * conn_all + 2 * conn_trained
        tower = 0 if getattr(base, "vision_features_cached", False) else 2 * vis_all + 4 * vis_trained
        return float(llm), float(llm + connector + tower)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer.log plus throughput: ``tokens_per_second`` (text), ``image_tokens_per_second`` and
        ``samples_per_second`` since the last log on step logs; ``train_*`` of the whole run (and
        ``train_mfu`` where the device's peak is known) on the final metrics."""
        if "loss" in logs or "train_runtime" in logs:
            now, totals = time.perf_counter(), self._all_ranks_throughput()
            if "loss" in logs and self._last_log is not None:
                then, before = self._last_log
                rates = (totals - before) / max(now - then, 1e-9)
                logs.update(
                    samples_per_second=rates[0].item(),
                    tokens_per_second=rates[1].item(),
                    image_tokens_per_second=rates[2].item(),
                )
            self._last_log = (now, totals)
            if "train_runtime" in logs and totals[0] > 0:
                rates = totals / max(float(logs["train_runtime"]), 1e-9)
                logs.update(
                    train_samples_per_second=rates[0].item(),
                    train_tokens_per_second=rates[1].item(),
                    train_image_tokens_per_second=rates[2].item(),
                )
                peak = device_peak_flops(self.args.device)
                if peak is not None:
                    per_text, per_image = self._model_flops_per_token()
                    achieved = (per_text * rates[1] + per_image * rates[2]).item()
                    logs["train_mfu"] = achieved / (peak * max(self.args.world_size, 1))
        super().log(logs, start_time)

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
        stats = inputs.pop(BATCH_STATS, None)
        if count_skips:
            self.skip_report.update(skipped)
            if stats is not None:
                self.throughput += stats.cpu()
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
