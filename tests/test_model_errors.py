"""Bad inputs get a clear error, never a crash deep inside torch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mllm import MllmConfig, MllmForConditionalGeneration, MllmProcessor
from mllm.models.processing_mllm import ensure_image_token


@pytest.fixture(scope="module")
def pair(tiny_components):
    model = MllmForConditionalGeneration.from_components(
        tiny_components["clip-vision"], tiny_components["llama"]
    )
    processor = MllmProcessor.from_components(
        tiny_components["clip-vision"],
        tiny_components["llama"],
        num_image_tokens=model.config.num_image_tokens,
    )
    return model.eval(), processor


def red() -> Image.Image:
    return Image.new("RGB", (32, 32), "red")


def test_hidden_size_mismatch_is_bridged_by_the_connector(pair):
    model, processor = pair
    assert model.config.vision_config.hidden_size != model.config.text_config.hidden_size
    features = model.get_image_features(processor(["<image>"], images=[red()])["pixel_values"])
    assert features.shape == (1, model.config.num_image_tokens, model.config.text_config.hidden_size)


def test_more_placeholders_than_images(pair):
    _, processor = pair
    with pytest.raises(ValueError, match=r"hold 2 '<image>' placeholder\(s\) but 1 image\(s\)"):
        processor(["<image> and <image>"], images=[red()])


def test_fewer_placeholders_than_images(pair):
    _, processor = pair
    with pytest.raises(ValueError, match=r"hold 1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        processor(["<image> only"], images=[red(), red()])


def test_per_prompt_image_lists_are_checked_per_prompt(pair):
    _, processor = pair
    with pytest.raises(ValueError, match="prompt 1 holds 0"):
        processor(["<image> a", "no image here"], images=[[red()], [red()]])


def test_model_refuses_image_token_count_mismatch(pair):
    model, processor = pair
    batch = processor(["<image> text"], images=[red()])
    cut = {k: v[:, 3:] if k != "pixel_values" else v for k, v in batch.items()}  # truncated inside the run
    with pytest.raises(ValueError, match="image-token positions but 1 image"):
        model(**cut)


def test_model_refuses_image_tokens_without_pixels(pair):
    model, processor = pair
    batch = processor(["<image> text"], images=[red()])
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model(input_ids=batch["input_ids"])


def test_image_token_colliding_with_a_real_token(tiny_components):
    tokenizer = AutoTokenizer.from_pretrained(tiny_components["llama"])
    real = "Ġcircle"  # byte-level BPE spelling of " circle"
    assert real in tokenizer.get_vocab()
    with pytest.raises(ValueError, match="already an ordinary token"):
        ensure_image_token(tokenizer, real)
    with pytest.raises(ValueError, match="already an ordinary token"):
        MllmForConditionalGeneration.from_components(
            tiny_components["clip-vision"], tiny_components["llama"], image_token=real
        )


def test_image_token_is_added_once_and_embeddings_grow(tiny_components):
    tokenizer = AutoTokenizer.from_pretrained(tiny_components["llama"])
    first = ensure_image_token(tokenizer, "<image>")
    assert ensure_image_token(tokenizer, "<image>") == first
    model = MllmForConditionalGeneration.from_components(
        tiny_components["clip-vision"], tiny_components["llama"]
    )
    assert model.config.image_token_id == first
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


@pytest.mark.parametrize("role", ["vision", "llm"])
def test_missing_component_path_is_named(tiny_components, tmp_path, role):
    missing = tmp_path / "no-such-model"
    vision = missing if role == "vision" else tiny_components["clip-vision"]
    llm = missing if role == "llm" else tiny_components["llama"]
    with pytest.raises(ValueError, match=f"could not load the .*`{missing}`"):
        MllmForConditionalGeneration.from_components(vision, llm)


def test_unknown_connector_lists_choices(tiny_components):
    with pytest.raises(
        ValueError, match="`mlp2x` is not a known connector; choose one of: linear, mlp, qformer"
    ):
        MllmForConditionalGeneration.from_components(
            tiny_components["clip-vision"], tiny_components["llama"], connector="mlp2x"
        )


def test_unsupported_vision_tower_is_refused():
    with pytest.raises(
        ValueError, match="not a known vision tower model_type; choose one of: clip_vision_model"
    ):
        MllmConfig(vision_config={"model_type": "vit"}, text_config={"model_type": "llama"})


def test_vision_feature_layer_out_of_range():
    with pytest.raises(ValueError, match="vision_feature_layer=-9 is out of range"):
        MllmConfig(
            vision_config={"model_type": "clip_vision_model", "num_hidden_layers": 2}, vision_feature_layer=-9
        )


def test_generate_never_emits_the_image_token(pair):
    model, _ = pair
    assert model.generation_config.suppress_tokens == [model.config.image_token_id]
    assert torch.is_tensor(model.get_input_embeddings().weight)
