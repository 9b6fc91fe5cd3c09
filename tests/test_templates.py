"""Templates: golden renders, supervised tokens == assistant contents, loud errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mllm.data.formats import Turn
from mllm.data.templates import IGNORE_INDEX, TEMPLATES, render, render_and_mask, show_supervision
from tests.data_fixtures import make_processor

GOLDEN = Path(__file__).parent / "golden" / "templates"
LLMS = ("llama", "qwen2", "gpt2")
SAMPLE = (
    Turn("user", "<image>\nWhat color is the circle?"),
    Turn("assistant", "red"),
    Turn("user", "How many squares are there?"),
    Turn("assistant", "There are 2 squares."),
)
MULTI = (
    Turn("system", "You answer briefly."),
    Turn("user", "<image>\nDescribe the image."),
    Turn("assistant", "a small blue circle at the top left"),
    Turn("user", "Is there a red square?"),
    Turn("assistant", "no"),
    Turn("user", "What is on the right?"),
    Turn("assistant", "a large green triangle"),
)


@pytest.fixture(scope="module")
def tokenizers(tiny_components):
    return {llm: make_processor(tiny_components, llm).tokenizer for llm in LLMS}


def _cases():
    for name in TEMPLATES.names():
        for llm in LLMS:
            if name == "auto" and llm == "gpt2":
                continue  # no chat template: an error, tested below
            yield name, llm


def _end_token(name: str, tokenizer) -> str:
    """The end-of-turn token the template should supervise after each assistant message."""
    if name == "auto" or (name == "llama3" and "<|eot_id|>" in tokenizer.get_vocab()):
        return "<|eot_id|>" if "<|eot_id|>" in tokenizer.get_vocab() else "<|im_end|>"
    if name in ("qwen2", "chatml") and "<|im_end|>" in tokenizer.get_vocab():
        return "<|im_end|>"
    return tokenizer.eos_token


@pytest.mark.parametrize("name,llm", list(_cases()))
def test_golden_render(name, llm, tokenizers):
    """The rendered prompt with its supervised runs in [[ ]] matches the reviewed golden file."""
    got = show_supervision(SAMPLE, tokenizers[llm], name) + "\n"
    path = GOLDEN / f"{name}__{llm}.txt"
    if os.environ.get("MLLM_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == got


@pytest.mark.parametrize("turns", [SAMPLE, MULTI], ids=["two-turn", "three-turn+system"])
@pytest.mark.parametrize("name,llm", list(_cases()))
def test_supervised_tokens_are_the_assistant_messages(name, llm, turns, tokenizers):
    tokenizer = tokenizers[llm]
    ids, labels = render_and_mask(turns, tokenizer, name)
    assert len(ids) == len(labels)
    supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    decoded = "".join(tokenizer.decode([t]) for t in supervised)
    end = _end_token(name, tokenizer)
    # A BPE token may carry the space that the template puts before the message ("ASSISTANT: red").
    pattern = "".join(" ?" + re.escape(t.content + end) for t in turns if t.role == "assistant")
    assert re.fullmatch(pattern, decoded), (decoded, pattern)


@pytest.mark.parametrize("name,llm", list(_cases()))
def test_image_placeholder_is_one_unsupervised_token(name, llm, tokenizers):
    tokenizer = tokenizers[llm]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = render_and_mask(SAMPLE, tokenizer, name)
    assert ids.count(image_id) == 1
    assert labels[ids.index(image_id)] == IGNORE_INDEX


def test_mask_follows_the_text_not_piecewise_lengths(tokenizers):
    """Assistant text that merges with its neighbours under BPE is still masked by its characters."""
    tokenizer = tokenizers["llama"]
    turns = (Turn("user", "<image>colour?"), Turn("assistant", "red and blue"))
    ids, labels = render_and_mask(turns, tokenizer, "plain")
    assert (
        tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        == "red and blue<|eot_id|>"
    )
    assert render(turns, tokenizer, "plain").text == "<|begin_of_text|><image>red and blue<|eot_id|>"


def test_vicuna_system_prompt_and_separators(tokenizers):
    text = render(SAMPLE, tokenizers["qwen2"], "vicuna_v1").text
    assert text.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert " USER: <image>\nWhat color is the circle? ASSISTANT: red<|im_end|>USER: How many" in text


def test_unknown_template_lists_choices(tokenizers):
    with pytest.raises(ValueError, match="vicuna_v1") as info:
        render_and_mask(SAMPLE, tokenizers["llama"], "vicuna")
    assert "chatml" in str(info.value) and "plain" in str(info.value)


@pytest.mark.parametrize("template", [None, "auto"])
def test_no_chat_template_suggests_named_templates(template, tokenizers):
    with pytest.raises(ValueError, match="no chat_template.*vicuna_v1"):
        render_and_mask(SAMPLE, tokenizers["gpt2"], template)


def test_qwen2_and_chatml_are_the_same_template():
    assert TEMPLATES.get("qwen2") is TEMPLATES.get("chatml")
