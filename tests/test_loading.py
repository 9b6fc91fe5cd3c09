"""load_model_and_processor / from_pretrained on output dirs; stages.train with init_from."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from mllm.config import build_run_config
from mllm.models import MllmForConditionalGeneration
from mllm.models.loading import load_model_and_processor
from mllm.training.checkpoint import NotAnOutputDirError
from mllm.training.stages import TrainResult, train
from tests.test_checkpoint import probe_inputs
from tests.test_trainer import make_run


def test_not_an_output_dir_names_the_path(tiny_components, tmp_path):
    with pytest.raises(NotAnOutputDirError, match=str(tiny_components["llama"])):
        load_model_and_processor(tiny_components["llama"])
    with pytest.raises(NotAnOutputDirError, match="nowhere"):
        load_model_and_processor(tmp_path / "nowhere")


@pytest.mark.parametrize("tune_llm", ["full", "lora"])
def test_plain_from_pretrained_loads_output_dirs(tiny_components, tmp_path, tune_llm):
    trainer = make_run(tiny_components, tmp_path, tune_llm=tune_llm, max_steps=1, save_steps=100)
    trainer.train()
    trainer.save_model(str(tmp_path))
    reference, processor = load_model_and_processor(tmp_path)
    with torch.no_grad():
        expected = reference(**probe_inputs(processor)).logits
    for loader in (AutoModelForImageTextToText, MllmForConditionalGeneration):
        model = loader.from_pretrained(str(tmp_path))
        assert type(model) is MllmForConditionalGeneration  # LoRA merged, not a peft wrapper
        with torch.no_grad():
            torch.testing.assert_close(model(**probe_inputs(processor)).logits, expected, rtol=0, atol=1e-4)


def test_stage_two_starts_from_stage_one(tiny_components, tmp_path):
    from data_tools.synth import generate_dataset

    generate_dataset(tmp_path / "data", num_scenes=8, seed=0, image_size=32)
    common = [
        f"vision_tower={tiny_components['clip-vision']}",
        f"model_name_or_path={tiny_components['qwen2']}",
        f"image_folder={tmp_path / 'data'}",
        "max_steps=2",
        "per_device_train_batch_size=2",
        "save_steps=100",
        "use_cpu=true",
        "logging_steps=1",
        "learning_rate=1e-2",
    ]
    stage1 = build_run_config(
        None,
        [*common, f"data_path={tmp_path / 'data' / 'stage1_train.json'}", f"output_dir={tmp_path / 's1'}"],
    )
    result = train(stage1)
    assert isinstance(result, TrainResult) and result.global_step == 2 and result.train_loss > 0
    stage1_model, _ = load_model_and_processor(tmp_path / "s1")
    stage2 = build_run_config(
        None,
        [
            *common,
            f"data_path={tmp_path / 'data' / 'stage2_train.json'}",
            f"output_dir={tmp_path / 's2'}",
            f"init_from={tmp_path / 's1'}",
            "tune_llm=lora",
            "lora_r=4",
            "lora_alpha=8",
            "tune_connector=frozen",
        ],
    )
    train(stage2)
    record = json.loads((tmp_path / "s2" / "mllm_run.json").read_text())
    assert record["model_name_or_path"] == str(tiny_components["qwen2"])
    stage2_model, _ = load_model_and_processor(tmp_path / "s2")
    # the connector was frozen in stage 2: it must be exactly stage 1's
    for (name, a), (_, b) in zip(
        stage1_model.connector.state_dict().items(),
        stage2_model.get_base_model().connector.state_dict().items(),
    ):
        assert torch.equal(a, b), name


def _logits(model, processor):
    with torch.no_grad():
        return model.eval()(**probe_inputs(processor)).logits


@pytest.mark.parametrize(
    ("modes", "fmt"),
    [
        ({"tune_llm": "full"}, "full"),
        ({"tune_llm": "frozen"}, "trained"),
        ({"tune_llm": "lora", "tune_vision": "full"}, "trained"),
        ({"tune_llm": "frozen", "tune_vision": "lora"}, "trained"),
        ({"tune_llm": "qlora"}, "trained"),
        ({"tune_llm": "lora", "merge": True}, "full"),
    ],
)
def test_round_trip_per_format(tiny_components, tmp_path, modes, fmt):
    """save_pretrained (via the trainer) -> from_pretrained gives the trained model back, for each format;
    a second save of the loaded model writes the same files and logits."""
    import mllm  # noqa: F401  (registers the Auto classes)
    from mllm.run_dir import read_record
    from mllm.training.merge import merge

    modes = dict(modes)
    do_merge = modes.pop("merge", False)
    trainer = make_run(
        tiny_components, tmp_path / "run", max_steps=1, save_steps=100, lora_dropout=0.0, **modes
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    run = merge(tmp_path / "run", tmp_path / "merged") if do_merge else tmp_path / "run"
    assert read_record(run).format == fmt
    reference, processor = load_model_and_processor(run, quantize=False)
    expected = _logits(reference, processor)
    model = AutoModelForImageTextToText.from_pretrained(str(run))
    assert type(model) is MllmForConditionalGeneration
    torch.testing.assert_close(_logits(model, processor), expected, rtol=0, atol=1e-4)
    if fmt == "full":  # a plain model saved with save_pretrained loads back the same
        model.save_pretrained(tmp_path / "again")
        again = MllmForConditionalGeneration.from_pretrained(str(tmp_path / "again"))
        torch.testing.assert_close(_logits(again, processor), expected, rtol=0, atol=1e-4)


def _stage1(tiny_components, tmp_path, **overrides):
    trainer = make_run(tiny_components, tmp_path / "s1", max_steps=1, save_steps=100, **overrides)
    trainer.train()
    trainer.save_model(str(tmp_path / "s1"))
    return tmp_path / "s1"


def _stage2_config(tiny_components, tmp_path, *overrides):
    return build_run_config(
        None,
        [
            f"init_from={tmp_path / 's1'}",
            "data_path=unused.json",
            f"output_dir={tmp_path / 's2'}",
            "use_cpu=true",
            "tune_llm=lora",
            "lora_r=4",
            "lora_alpha=8",
            *overrides,
        ],
    )


def test_init_from_refuses_a_changed_architecture_key(tiny_components, tmp_path):
    from mllm.config import ConfigError
    from mllm.training.stages import load_for_training

    _stage1(tiny_components, tmp_path)
    for override, both in (
        ("connector_depth=3", ("3", "2")),
        ("vision_feature_layer=-1", ("-1", "-2")),
        (
            f"model_name_or_path={tiny_components['qwen2']}",
            (str(tiny_components["qwen2"]), str(tiny_components["llama"])),
        ),
    ):
        run = _stage2_config(tiny_components, tmp_path, override)
        with pytest.raises(ConfigError) as err:
            load_for_training(run)
        key = override.split("=")[0]
        assert f"`{key}`" in str(err.value) and all(v in str(err.value) for v in both), str(err.value)
    # the same values as the earlier run are fine, and the record keeps the earlier components
    run = _stage2_config(
        tiny_components, tmp_path, "connector_depth=2", f"vision_tower={tiny_components['clip-vision']}"
    )
    _, _, record = load_for_training(run)
    assert record.model_name_or_path == str(tiny_components["llama"])
    assert record.tuning["tune_llm"] == "lora"


@pytest.mark.parametrize("stage1_llm", ["frozen", "full"])
def test_init_from_applies_attn_implementation(tiny_components, tmp_path, stage1_llm):
    """attn_implementation is a runtime choice: a later stage sets it (it was silently dropped before)."""
    from mllm.training.stages import load_for_training

    _stage1(tiny_components, tmp_path, tune_llm=stage1_llm)
    for impl in ("eager", "sdpa"):
        model, _, _ = load_for_training(
            _stage2_config(tiny_components, tmp_path, f"attn_implementation={impl}", "tune_llm=frozen")
        )
        assert model.language_model.config._attn_implementation == impl


def test_qformer_size_keys_shape_a_fresh_qformer_connector(tiny_components, tmp_path):
    """A randomly initialised Q-Former connector takes the recipe's size keys, as stage 1's does (they
    were ignored before: the connector always had 2 layers and a cross-attention every 2nd)."""
    from mllm.training.stages import load_for_training

    keys = ["qformer_num_layers=3", "qformer_hidden_size=32", "qformer_num_heads=4"]
    keys += ["qformer_cross_attention_freq=1", "num_query_tokens=5"]
    run = build_run_config(
        None,
        [
            f"vision_tower={tiny_components['clip-vision']}",
            f"model_name_or_path={tiny_components['llama']}",
            "connector_type=qformer",
            "data_path=unused.json",
            f"output_dir={tmp_path / 'q'}",
            "use_cpu=true",
            *keys,
        ],
    )
    model, processor, _ = load_for_training(run)
    qcfg = model.config.qformer_config
    assert (qcfg.num_hidden_layers, qcfg.hidden_size, qcfg.num_attention_heads) == (3, 32, 4)
    assert qcfg.cross_attention_frequency == 1
    layers = model.connector.qformer.encoder.layer
    assert all(layer.has_cross_attention for layer in layers)  # every layer reads the image
    pixel_values = processor(text=["<image>"], images=[[Image.new("RGB", (32, 32))]])["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values)
    assert out.shape == (1, 5, model.config.text_config.hidden_size)
