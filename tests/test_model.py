"""The composed model: every connector x vision tower x LLM family, splice, save/load, Auto classes, generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mllm import MllmForConditionalGeneration, MllmProcessor

VISIONS = ["clip-vision", "siglip-vision"]
LLMS = ["llama", "qwen2", "gpt2"]
CONNECTORS = ["linear", "mlp", "qformer"]


def build(tiny: dict[str, Path], vision: str, llm: str, connector: str = "mlp", **kw):
    torch.manual_seed(0)
    model = MllmForConditionalGeneration.from_components(
        tiny[vision], tiny[llm], connector=connector, num_query_tokens=4, **kw
    )
    processor = MllmProcessor.from_components(
        tiny[vision], tiny[llm], num_image_tokens=model.config.num_image_tokens
    )
    return model, processor


def images(n: int) -> list[Image.Image]:
    colours = ["red", "blue", "green", "yellow"]
    return [Image.new("RGB", (40 + 8 * i, 36), colours[i % 4]) for i in range(n)]


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("llm", LLMS)
@pytest.mark.parametrize("vision", VISIONS)
def test_forward_loss_backward(tiny_components, vision, llm, connector):
    model, processor = build(tiny_components, vision, llm, connector)
    batch = processor(
        ["<image>\nWhat colour is it? red", "two images <image> and <image>: blue"], images=images(3)
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    connector_grads = [p.grad for p in model.connector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in connector_grads)
    assert any(g.abs().sum() > 0 for g in connector_grads)
    assert model.vision_tower.get_input_embeddings().weight.grad is not None  # gradient reaches the tower


def test_image_tokens_count_follows_config(tiny_components):
    clip, _ = build(tiny_components, "clip-vision", "llama", "mlp")
    assert clip.config.num_image_tokens == 9  # (48 / 16)^2 patches, CLS dropped by default
    keep, _ = build(tiny_components, "clip-vision", "llama", "mlp", vision_feature_select_strategy="full")
    assert keep.config.num_image_tokens == 10
    siglip, _ = build(tiny_components, "siglip-vision", "llama", "mlp", vision_feature_select_strategy="full")
    assert siglip.config.num_image_tokens == 9  # SigLIP has no CLS to keep
    qformer, _ = build(tiny_components, "clip-vision", "llama", "qformer")
    assert qformer.config.num_image_tokens == 4


@pytest.mark.parametrize("llm", LLMS)
def test_image_features_land_at_placeholder_positions(tiny_components, llm):
    model, processor = build(tiny_components, "clip-vision", llm)
    model.eval()
    batch = processor(["a <image> then text <image>", "<image> only one"], images=images(3))
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
        expected_images = model.get_image_features(batch["pixel_values"])  # [3, 9, D]
        token_embeds = model.get_input_embeddings()(batch["input_ids"])
    handle.remove()
    embeds = seen["embeds"]
    mask = batch["input_ids"] == model.config.image_token_id
    assert int(mask.sum()) == 3 * model.config.num_image_tokens
    # Image rows, in placeholder order, are the connector outputs; all other rows are token embeddings.
    torch.testing.assert_close(embeds[mask], expected_images.reshape(-1, expected_images.shape[-1]))
    torch.testing.assert_close(embeds[~mask], token_embeds[~mask])
    # Each run of image tokens is contiguous and belongs to one image.
    first_row = mask[0].nonzero().flatten()
    n = model.config.num_image_tokens
    assert first_row[n - 1] - first_row[0] == n - 1


@pytest.mark.parametrize("connector", CONNECTORS)
def test_save_load_round_trip_identical_logits(tiny_components, tmp_path, connector):
    model, processor = build(tiny_components, "siglip-vision", "qwen2", connector)
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MllmForConditionalGeneration
    assert type(loaded_processor) is MllmProcessor
    assert loaded_processor.num_image_tokens == processor.num_image_tokens
    assert loaded_processor.image_token_id == model.config.image_token_id
    prompt, imgs = ["<image>\nWhat is it?"], images(1)
    with torch.no_grad():
        before = model(**processor(prompt, images=imgs)).logits
        after = loaded(**loaded_processor(prompt, images=imgs)).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("llm", LLMS)
def test_generate_with_and_without_cache_agree(tiny_components, llm):
    model, processor = build(tiny_components, "clip-vision", llm)
    model.eval()
    batch = processor(["<image>\nDescribe the image briefly."], images=images(1))
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 6
    assert torch.equal(cached, uncached)
    assert model.config.image_token_id not in cached[0, batch["input_ids"].shape[1] :].tolist()


def test_image_changes_the_output(tiny_components):
    model, processor = build(tiny_components, "clip-vision", "llama")
    model.eval()
    prompt = ["<image>\nWhat colour?"]
    with torch.no_grad():
        red = model(**processor(prompt, images=[Image.new("RGB", (32, 32), "red")])).logits[0, -1]
        blue = model(**processor(prompt, images=[Image.new("RGB", (32, 32), "blue")])).logits[0, -1]
    assert not torch.allclose(red, blue)


@pytest.mark.parametrize(
    "arch",
    [
        {"connector_type": "qformer", "num_query_tokens": 5, "vision_feature_layer": -1},
        {"connector_type": "mlp", "connector_depth": 3, "vision_feature_select_strategy": "full"},
    ],
)
def test_architecture_is_mapped_once(tiny_components, arch):
    """`MllmConfig.architecture()` rebuilds the same architecture through `from_components`; the recipe's
    architecture keys are exactly ModelArguments fields of the same name."""
    import dataclasses

    from mllm.config import ModelArguments
    from mllm.models.configuration_mllm import ARCHITECTURE_FIELDS, RECIPE_ARCHITECTURE_KEYS

    assert set(RECIPE_ARCHITECTURE_KEYS) <= set(ARCHITECTURE_FIELDS)
    assert set(RECIPE_ARCHITECTURE_KEYS) <= {f.name for f in dataclasses.fields(ModelArguments)}
    vision, llm = tiny_components["clip-vision"], tiny_components["llama"]
    model = MllmForConditionalGeneration.from_components(vision, llm, **arch)
    again = MllmForConditionalGeneration.from_components(vision, llm, **model.config.architecture())
    assert again.config.architecture() == model.config.architecture()
    assert again.config.num_image_tokens == model.config.num_image_tokens
    for key, value in arch.items():
        assert getattr(again.config, key) == value
    with pytest.raises(ValueError, match="disagree"):
        MllmForConditionalGeneration.from_components(vision, llm, connector="mlp", connector_type="linear")
