"""Batched greedy generation: left padding, new tokens only, same answers batched or alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm.inference import build_generation_prompt, generate_answers
from mllm.models import MllmForConditionalGeneration, MllmProcessor

PROMPTS = [
    "<image>\nwhat color is the circle?",
    "<image>\nhow many squares are there? please look carefully at the image and count",
    "is there a red square?",  # text only: no image in this row
    "<image>\ndescribe",
    "<image>\nwhere is the blue triangle?",
]


@pytest.fixture(scope="module")
def tiny_model(tiny_components: dict[str, Path]) -> tuple[MllmForConditionalGeneration, MllmProcessor]:
    torch.manual_seed(0)
    vision, llm = tiny_components["clip-vision"], tiny_components["llama"]
    model = MllmForConditionalGeneration.from_components(vision, llm, connector="mlp").eval()
    processor = MllmProcessor.from_components(str(vision), str(llm), model.config.num_image_tokens)
    return model, processor


def _images() -> list[list[Image.Image]]:
    colors = [(220, 20, 20), (20, 200, 20), None, (20, 20, 220), (240, 240, 0)]
    return [[] if c is None else [Image.new("RGB", (40 + 8 * i, 32), c)] for i, c in enumerate(colors)]


def test_batched_equals_one_by_one(tiny_model) -> None:
    model, processor = tiny_model
    processor.tokenizer.padding_side = "right"
    batched = generate_answers(model, processor, PROMPTS, _images(), max_new_tokens=6, batch_size=4)
    alone = [
        generate_answers(model, processor, [p], [i], max_new_tokens=6, batch_size=1)[0]
        for p, i in zip(PROMPTS, _images())
    ]
    assert batched == alone
    assert any(batched), "the tiny model generated only empty answers; the comparison proves nothing"
    assert processor.tokenizer.padding_side == "right"  # restored


def test_kv_cache_gives_same_tokens(tiny_model) -> None:
    model, processor = tiny_model
    with_cache = generate_answers(model, processor, PROMPTS, _images(), max_new_tokens=6, use_cache=True)
    without = generate_answers(model, processor, PROMPTS, _images(), max_new_tokens=6, use_cache=False)
    assert with_cache == without


def test_answers_depend_on_the_image(tiny_model) -> None:
    """The image reaches the LLM: different images give different greedy answers for some prompt."""
    model, processor = tiny_model
    prompts = ["<image>\nwhat color is the circle?"] * 4
    images = [[Image.new("RGB", (32, 32), c)] for c in [(255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)]]
    answers = generate_answers(model, processor, prompts, images, max_new_tokens=8)
    assert len(set(answers)) > 1


def test_peft_wrapped_model_generates(tiny_model) -> None:
    """A freshly initialised LoRA (B = 0) leaves the function unchanged: same answers as the base model."""
    peft = pytest.importorskip("peft")
    model, processor = tiny_model
    expected = generate_answers(model, processor, PROMPTS[:3], _images()[:3], max_new_tokens=5)
    wrapped = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"),
    )
    assert isinstance(wrapped, peft.PeftModel)
    assert generate_answers(wrapped, processor, PROMPTS[:3], _images()[:3], max_new_tokens=5) == expected


def test_prompt_lists_must_match(tiny_model) -> None:
    model, processor = tiny_model
    with pytest.raises(ValueError, match="one list per prompt"):
        generate_answers(model, processor, PROMPTS, _images()[:2])


def test_generation_prompt_templates(tiny_model, tiny_components: dict[str, Path]) -> None:
    _, processor = tiny_model
    tok = processor.tokenizer
    own = build_generation_prompt("<image>\nwhat color?", tok, None)
    assert own.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<image>\nwhat color?" in own
    vicuna = build_generation_prompt("<image>\nwhat color?", tok, "vicuna_v1")
    assert vicuna.endswith("USER: <image>\nwhat color? ASSISTANT:")
    assert build_generation_prompt("q", tok, "llama3").endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )

    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(tiny_components["gpt2"])
    with pytest.raises(ValueError, match="no chat_template"):
        build_generation_prompt("q", gpt2, None)


def test_generation_prompt_of_a_conversation_is_the_training_prefix(tiny_model) -> None:
    """Context turns (system, user, assistant) and the last user turn render as `mllm train` renders
    them, cut where the last answer starts; a single string is the same as one user turn."""
    from mllm.data.formats import Turn
    from mllm.data.templates import render

    _, processor = tiny_model
    tok = processor.tokenizer
    context = [Turn("system", "Be brief."), Turn("user", "<image>\nwhat shape?"), Turn("assistant", "circle")]
    question = Turn("user", "and its color?")
    for template in (None, "vicuna_v1", "llama3", "chatml"):
        prompt = build_generation_prompt([*context, question], tok, template)
        trained = render([*context, question, Turn("assistant", "red")], tok, template)
        assert prompt == trained.text[: trained.spans[-1][0]].rstrip(" "), template
        assert "circle" in prompt and "Be brief." in prompt
        assert build_generation_prompt([question], tok, template) == build_generation_prompt(
            question.content, tok, template
        )
    with pytest.raises(ValueError, match="end with a user turn"):
        build_generation_prompt([*context], tok, "vicuna_v1")
