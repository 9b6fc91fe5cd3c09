"""`MllmProcessor.apply_chat_template` takes transformers' multimodal messages with any LLM's template."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mllm.models.processing_mllm import MllmProcessor
from tests.chat_templates import FAMILIES, tokenizer_for

NUM_IMAGE_TOKENS = 4
PARTS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": "And the shape?"},
]
STRINGS = [
    {"role": "user", "content": "<image>\nWhat color is it?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the shape?"},
]


def _processor(family) -> MllmProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return MllmProcessor(image_processor, tokenizer_for(family, "bpe"), num_image_tokens=NUM_IMAGE_TOKENS)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_parts_render_as_the_string_content_training_uses(family):
    """Image parts become the placeholder where they stand; string content keeps working."""
    processor = _processor(family)
    expected = processor.tokenizer.apply_chat_template(STRINGS, tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(PARTS, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(STRINGS, add_generation_prompt=True) == expected
    assert expected.count("<image>") == 1


def test_chatml_string_template_used_to_refuse_parts():
    """The bug: a ChatML template concatenates ``message['content']`` as a string."""
    family = next(f for f in FAMILIES if f.name == "smollm2")
    tokenizer = _processor(family).tokenizer
    with pytest.raises(TypeError):
        tokenizer.apply_chat_template(PARTS, tokenize=False)


def test_tokenize_with_an_inline_image_gives_model_inputs():
    family = next(f for f in FAMILIES if f.name == "qwen2.5")
    processor = _processor(family)
    image = Image.new("RGB", (40, 40), (255, 0, 0))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}
    ]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert (out["input_ids"] == processor.image_token_id).sum().item() == NUM_IMAGE_TOKENS
    assert tuple(out["pixel_values"].shape) == (1, 3, 32, 32)
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids.tolist() == out["input_ids"].tolist()


def test_batched_conversations_and_images_given_apart():
    family = next(f for f in FAMILIES if f.name == "llama3")
    processor = _processor(family)
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    images = [[Image.new("RGB", (32, 32))], [Image.new("RGB", (32, 32))]]
    out = processor.apply_chat_template(
        [bare, bare], add_generation_prompt=True, tokenize=True, return_dict=True, images=images
    )
    assert out["input_ids"].shape[0] == 2 and out["pixel_values"].shape[0] == 2


def test_a_part_that_is_neither_text_nor_image_is_named():
    processor = _processor(FAMILIES[0])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[1\]"):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}]
        )
