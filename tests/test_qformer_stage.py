"""BLIP-2 through `mllm train`: stage 1 trains the Q-Former alone and resumes exactly; stage 2 starts from
it (init_from), and its output dir loads and generates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import build_run_config
from mllm.training.stages import train

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "recipes" / "blip2" / "stage1_qformer.yaml"
STAGE2 = REPO / "recipes" / "blip2" / "stage2_generative.yaml"


def _stage1(tiny_components, data: Path, out: Path, *more: str):
    return build_run_config(
        STAGE1,
        [
            f"vision_tower={tiny_components['clip-vision']}",
            f"model_name_or_path={tiny_components['llama']}",
            f"data_path={data / 'stage1_train.json'}",
            f"image_folder={data}",
            f"output_dir={out}",
            "num_query_tokens=4",
            "qformer_hidden_size=32",
            "qformer_embed_dim=16",
            "qformer_max_text_length=24",
            "per_device_train_batch_size=6",
            "logging_steps=1",
            "save_total_limit=null",
            *more,
        ],
    )


def _stage2(tiny_components, stage1_run: Path, data: Path, out: Path, *more: str):
    return build_run_config(
        STAGE2,
        [
            f"model_name_or_path={tiny_components['llama']}",
            f"init_from={stage1_run}",
            f"data_path={data / 'stage1_train.json'}",
            f"image_folder={data}",
            f"output_dir={out}",
            *more,
        ],
    )


@pytest.fixture(scope="module")
def stage1_run(tiny_components, synth_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blip2") / "stage1"
    result = train(_stage1(tiny_components, synth_small, out, "max_steps=4", "save_steps=2"))
    assert result.global_step == 4
    return out


def test_stage1_trains_three_losses_without_an_llm(stage1_run: Path) -> None:
    import json

    config = json.loads((stage1_run / "config.json").read_text())
    assert config["model_type"] == "mllm_qformer_pretrain" and "text_config" not in config
    logged = json.loads((stage1_run / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in logged if "loss" in e]
    assert steps and all(k in steps[0] for k in ("loss_itc", "loss_itm", "loss_itg"))
    assert (stage1_run / "mllm_run.json").is_file() and (stage1_run / "preprocessor_config.json").is_file()
    weights = load_file(str(stage1_run / "model.safetensors"))
    tower_before = load_file(str(Path(config["vision_config"]["_name_or_path"]) / "model.safetensors"))
    key = next(k for k in tower_before if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(weights[f"vision_tower.{key}"], tower_before[key]), "the vision tower stays frozen"


def test_stage1_checkpoint_resumes_exactly(stage1_run: Path, tiny_components, synth_small, tmp_path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(stage1_run / "checkpoint-2", out / "checkpoint-2")
    run = _stage1(
        tiny_components,
        synth_small,
        out,
        "max_steps=4",
        "save_steps=2",
        f"resume_from_checkpoint={out / 'checkpoint-2'}",
    )
    assert train(run).global_step == 4
    straight, resumed = (
        load_file(str(stage1_run / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert straight.keys() == resumed.keys()
    moved = load_file(str(stage1_run / "checkpoint-2" / "model.safetensors"))
    assert not torch.equal(moved["qformer.query_tokens"], straight["qformer.query_tokens"]), (
        "steps 3-4 trained"
    )
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key


def test_stage2_starts_from_stage1_loads_and_generates(
    stage1_run: Path, tiny_components, synth_small, tmp_path
) -> None:
    from mllm.models.modeling_mllm import MllmForConditionalGeneration
    from mllm.models.processing_mllm import MllmProcessor
    from mllm.training.qformer_stage import load_stage2_from_stage1

    out = tmp_path / "stage2"
    run = _stage2(
        tiny_components, stage1_run, synth_small, out, "max_steps=2", "per_device_train_batch_size=4"
    )
    model, _, _ = load_stage2_from_stage1(run)
    stage1 = load_file(str(stage1_run / "model.safetensors"))
    assert torch.equal(model.connector.query_tokens, stage1["qformer.query_tokens"])
    # the recipe's learned vision positions come along (a fresh set would scramble what the queries learned)
    assert torch.equal(model.connector.vision_positions, stage1["qformer.vision_positions"])
    key = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    assert torch.equal(model.connector.state_dict()[key], stage1[f"qformer.{key}"])
    assert model.config.num_image_tokens == 4 and not model.config.qformer_config.use_qformer_text_input
    del model

    result = train(run)
    assert result.global_step == 2
    loaded = MllmForConditionalGeneration.from_pretrained(out).eval()
    processor = MllmProcessor.from_pretrained(out)
    from PIL import Image

    image = Image.open(synth_small / "images" / "000000.png")
    inputs = processor(text="<image>\nDescribe the image.", images=image, return_tensors="pt")
    with torch.no_grad():
        generated = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_stage2_refuses_vision_positions_stage1_was_not_trained_with(
    stage1_run: Path, tiny_components, synth_small, tmp_path
) -> None:
    from mllm.config import ConfigError
    from mllm.training.qformer_stage import load_stage2_from_stage1

    # stage 1's recipe turned them on
    run = _stage2(
        tiny_components, stage1_run, synth_small, tmp_path / "stage2", "qformer_vision_positions=false"
    )
    with pytest.raises(ConfigError, match="`qformer_vision_positions` is False here but True in init_from"):
        load_stage2_from_stage1(run)
