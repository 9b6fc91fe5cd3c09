"""MllmTrainer: per-component learning rates, parameter table, skipped-record counts, sampler."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, TrainingArguments, set_seed

from mllm.config import TuningArguments
from mllm.data.collator import MllmCollator
from mllm.models.adapters import apply_tuning, llm_quantization_config, trainable_parameter_table
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor
from mllm.run_dir import RunRecord
from mllm.training.trainer import MllmTrainer

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


class TinyDataset(torch.utils.data.Dataset):
    """Image + caption samples (labels on the caption only), optionally one flagged as skipped."""

    def __init__(self, processor: MllmProcessor, n: int = 8, skipped: list | None = None) -> None:
        self.items = []
        names = list(COLORS)
        for i in range(n):
            color = names[i % len(names)]
            prompt = processor(text="<image>", images=[Image.new("RGB", (32, 32), COLORS[color])])
            answer = processor.tokenizer(f" a {color} circle", add_special_tokens=False)["input_ids"]
            ids = prompt["input_ids"][0].tolist() + answer
            labels = [-100] * prompt["input_ids"].shape[1] + answer
            item = {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "pixel_values": prompt["pixel_values"],
                "id": str(i),
            }
            if skipped and i == 0:
                item["skipped"] = skipped
            self.items.append(item)
        self.lengths = [len(it["input_ids"]) for it in self.items]
        self.modality = [True] * n

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def make_run(
    components: dict[str, Path],
    output_dir: Path,
    *,
    seed: int = 0,
    llm: str = "llama",
    trainer_kwargs: dict | None = None,
    dataset_kwargs: dict | None = None,
    **overrides: Any,
) -> MllmTrainer:
    """A tiny trainer: clip + ``llm``, tuning and TrainingArguments fields from ``overrides``."""
    tuning_fields = {f.name for f in dataclasses.fields(TuningArguments)}
    tuning = TuningArguments(
        **{
            "lora_r": 4,
            "lora_alpha": 8,
            "bnb_4bit_compute_dtype": "float32",
            **{k: v for k, v in overrides.items() if k in tuning_fields},
        }
    )
    args = {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_steps": 2,
        "report_to": "none",
        "seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
        **{k: v for k, v in overrides.items() if k not in tuning_fields},
    }
    vision, lm = str(components["clip-vision"]), str(components[llm])
    set_seed(seed)
    model = MllmForConditionalGeneration.from_components(
        vision, lm, connector="mlp", quantization_config=llm_quantization_config(tuning)
    )
    processor = MllmProcessor.from_components(vision, lm, num_image_tokens=model.config.num_image_tokens)
    model = apply_tuning(model, tuning)
    record = RunRecord.new(
        vision_tower=vision,
        model_name_or_path=lm,
        tuning=dataclasses.asdict(tuning),
        base_vocab_size=AutoConfig.from_pretrained(lm).vocab_size,
    )
    return MllmTrainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=TinyDataset(processor, **(dataset_kwargs or {})),
        data_collator=MllmCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        tuning=tuning,
        run_record=record,
        **(trainer_kwargs or {}),
    )


def step_losses(trainer: MllmTrainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def table_rows(table: str) -> dict[str, tuple[int, int]]:
    rows = {}
    for line in table.splitlines()[1:]:
        name, trainable, total, _ = line.split()
        rows[name] = (int(trainable.replace(",", "")), int(total.replace(",", "")))
    return rows


@pytest.mark.parametrize(
    ("modes", "expect_trainable"),
    [
        ({"tune_vision": "frozen", "tune_connector": "full", "tune_llm": "frozen"}, {"connector"}),
        (
            {"tune_vision": "full", "tune_connector": "frozen", "tune_llm": "full"},
            {"vision_tower", "language_model"},
        ),
        ({"tune_vision": "lora", "tune_connector": "full", "tune_llm": "lora"}, {"connector", "lora"}),
        ({"tune_vision": "frozen", "tune_connector": "full", "tune_llm": "qlora"}, {"connector", "lora"}),
    ],
)
def test_trainable_parameter_table(tiny_components, tmp_path, modes, expect_trainable):
    trainer = make_run(tiny_components, tmp_path, **modes)
    rows = table_rows(trainable_parameter_table(trainer.model))
    for component in ("vision_tower", "connector", "language_model", "lora"):
        trainable, total = rows[component]
        if component in expect_trainable:
            assert trainable == total > 0, (component, rows)
        else:
            assert trainable == 0, (component, rows)
    if modes["tune_llm"] == "qlora":  # 4-bit weights counted as parameters, not packed bytes
        full = table_rows(
            trainable_parameter_table(make_run(tiny_components, tmp_path, tune_llm="lora").model)
        )
        assert rows["language_model"][1] == full["language_model"][1]
    lora_names = [n for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert not any(".connector." in n for n in lora_names)
    assert any(".vision_tower." in n for n in lora_names) == (modes["tune_vision"] == "lora")


def test_component_learning_rates_reach_optimizer(tiny_components, tmp_path):
    trainer = make_run(
        tiny_components,
        tmp_path,
        tune_vision="full",
        tune_llm="lora",
        connector_lr=1e-2,
        vision_lr=2e-5,
        learning_rate=3e-4,
        weight_decay=0.1,
    )
    optimizer = trainer.create_optimizer()
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert by_name["connector/decay"]["lr"] == 1e-2
    assert by_name["vision_tower/decay"]["lr"] == 2e-5
    assert by_name["language_model/decay"]["lr"] == 3e-4  # the LLM's LoRA
    ids = {id(p): group["name"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in trainer.model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in ids
            continue
        group = ids[id(param)]
        no_decay = name.endswith("bias") or "norm" in name
        assert group.endswith("/no_decay") == no_decay, (name, group)
    assert all(
        g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.1) for g in optimizer.param_groups
    )


def test_skipped_records_counted_and_written(tiny_components, tmp_path):
    trainer = make_run(
        tiny_components,
        tmp_path,
        max_steps=4,
        save_steps=100,
        dataset_kwargs={"skipped": [("too_long", "r7"), ("missing_image", "r9")]},
    )
    result = trainer.train()
    assert result.global_step == 4
    report = json.loads((tmp_path / "skipped_records.json").read_text())
    assert report["total"] == 2 and report["by_reason"] == {"missing_image": 1, "too_long": 1}


def test_modality_length_sampler_used(tiny_components, tmp_path):
    from mllm.data.sampler import ModalityLengthGroupedSampler

    trainer = make_run(tiny_components, tmp_path, trainer_kwargs={"group_by_modality_length": True})
    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)
    trainer = make_run(tiny_components, tmp_path)
    assert not isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)


def test_vision_feature_source_replaces_pixel_values(tiny_components, tmp_path):
    calls = []

    def source(batch):
        calls.append(batch["pixel_values"].shape[0])
        tower = trainer.model.vision_tower
        with torch.no_grad():
            return tower(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-2][
                :, 1:
            ]

    trainer = make_run(
        tiny_components,
        tmp_path,
        max_steps=2,
        save_steps=100,
        trainer_kwargs={"vision_feature_source": source},
    )
    trainer.train()
    assert calls == [2, 2]
