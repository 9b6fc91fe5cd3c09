"""Throughput telemetry: a run logs samples/s, text tokens/s and image tokens/s (counted on the samples,
so packed rows count the samples they hold), the summary line prints them, MFU only with a known peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm.config import build_run_config
from mllm.data.dataset import build_dataset
from mllm.models.configuration_mllm import MllmConfig
from mllm.models.processing_mllm import MllmProcessor
from mllm.training.cli import summary
from mllm.training.stages import train
from mllm.training.trainer import device_peak_flops


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_tools.synth import generate_dataset

    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, num_scenes=4, seed=0, image_size=32)
    records = json.loads((out / "stage2_train.json").read_text())
    records += [
        {
            "id": f"t{i}",
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "two " * i}],
        }
        for i in range(1, 4)
    ]
    (out / "mixed.json").write_text(json.dumps(records))
    return out


@pytest.mark.parametrize(
    "packing", [True], ids=["packed"]
)  # packed rows: the case a row count would get wrong
def test_a_run_reports_samples_text_and_image_tokens_per_second(tiny_components, data, tmp_path, packing):
    vision, llm = str(tiny_components["clip-vision"]), str(tiny_components["llama"])
    out = tmp_path / "run"
    run = build_run_config(
        None,
        [
            f"vision_tower={vision}",
            f"model_name_or_path={llm}",
            f"image_folder={data}",
            f"data_path={data / 'mixed.json'}",
            f"output_dir={out}",
            "per_device_train_batch_size=2",
            "num_train_epochs=2",  # the padded path counts the same way (MllmCollator)
            "logging_steps=1",
            "use_cpu=true",
            "save_strategy=no",
            "disable_tqdm=true",
            f"packing={str(packing).lower()}",
            "packing_max_length=200",
        ],
    )
    result = train(run)
    n_image_tokens = MllmConfig.from_pretrained(out).num_image_tokens
    proc = MllmProcessor.from_components(vision, llm, num_image_tokens=n_image_tokens)
    dataset = build_dataset(data / "mixed.json", data, proc, None, 2048)
    image_tokens = sum(len(r.images) for r in dataset.records) * dataset.num_image_tokens
    text_tokens = sum(dataset.lengths) - image_tokens
    state = json.loads((out / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    # the rates times the runtime give back what two epochs hold: samples, not packed rows
    assert result.samples_per_second * runtime == pytest.approx(2 * len(dataset), rel=1e-6)
    assert result.tokens_per_second * runtime == pytest.approx(2 * text_tokens, rel=1e-6)
    assert result.image_tokens_per_second * runtime == pytest.approx(2 * image_tokens, rel=1e-6)
    steps = [e for e in state["log_history"] if "loss" in e]
    assert steps and all(e["tokens_per_second"] > 0 and "image_tokens_per_second" in e for e in steps)
    assert result.mfu is None  # CPU: no known peak, no made-up MFU
    line = summary(result)
    assert "samples/s" in line and " tokens/s" in line and "image tokens/s" in line and "MFU" not in line


def test_mfu_only_where_the_peak_is_known():
    assert device_peak_flops(torch.device("cpu")) is None
