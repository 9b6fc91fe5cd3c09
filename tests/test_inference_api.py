"""`mllm.inference.ChatModel`: a run dir or a live model, prompts or messages, streaming, batches, stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm.inference import ChatModel, build_generation_prompt, generate_answers
from mllm.models import MllmProcessor
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from tests.data_fixtures import save_tiny_lora_run


@pytest.fixture(scope="module")
def lora_run(tiny_components: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA run as `mllm train` saves it, with `template: chatml` recorded."""
    config = {"template": "chatml", "model_max_length": 256}
    return save_tiny_lora_run(tiny_components, tmp_path_factory.mktemp("lora-run"), "qwen2", config)


@pytest.fixture(scope="module")
def chat(lora_run: Path) -> ChatModel:
    return ChatModel.from_pretrained(lora_run)


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 32), (220, 20, 20)).save(path)
    return path


def test_run_dir_brings_its_template_and_context(chat: ChatModel) -> None:
    assert chat.template == "chatml"
    assert chat.context_length == 256
    im_end = chat.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in chat.stop_token_ids


def test_prompt_and_messages_give_the_same_answer(chat: ChatModel, image_file: Path) -> None:
    by_prompt = chat.generate("<image>\nwhat color is it?", images=[image_file], max_new_tokens=6)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image_file)},
                {"type": "text", "text": "what color is it?"},
            ],
        }
    ]
    assert chat.generate(messages, max_new_tokens=6) == by_prompt
    # no placeholder in the text: the image goes before the question, LLaVA's layout
    assert chat.generate("what color is it?", images=[image_file], max_new_tokens=6) == by_prompt
    # the same as the evaluation path, with the recorded template
    prompt = build_generation_prompt("<image>\nwhat color is it?", chat.processor.tokenizer, "chatml")
    expected = generate_answers(
        chat.model,
        chat.processor,
        [prompt],
        [[Image.open(image_file)]],
        max_new_tokens=6,
        stop_token_ids=chat.stop_token_ids,
    )
    assert by_prompt == expected[0] and by_prompt


def test_stream_yields_the_greedy_answer_piece_by_piece(chat: ChatModel, image_file: Path) -> None:
    pieces = list(chat.stream("<image>\ndescribe the image", images=[image_file], max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == chat.generate(
        "<image>\ndescribe the image", images=[image_file], max_new_tokens=12
    )


def test_batch_equals_one_by_one_and_text_only_works(chat: ChatModel, image_file: Path) -> None:
    conversations = ["<image>\nwhat is it?", "hello there", [{"role": "user", "content": "how many?"}]]
    images = [[image_file], [], []]
    batched = chat.generate_batch(conversations, images, max_new_tokens=5, batch_size=3)
    alone = [chat.generate(c, i, max_new_tokens=5) for c, i in zip(conversations, images)]
    assert batched == alone
    assert all(isinstance(a, str) for a in batched) and any(batched)


def test_multi_turn_history_is_rendered(chat: ChatModel) -> None:
    turns = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"},
    ]
    text, images = chat.prompt(turns)
    assert "first answer" in text and text.index("first answer") < text.index("second") and images == []


def test_generation_stops_on_the_end_of_turn_token(chat: ChatModel) -> None:
    """Making the greedy answer's third token a stop token ends the answer there (it is kept: only
    special tokens, as real end-of-turn tokens are, are dropped from the text)."""
    tokenizer = chat.processor.tokenizer
    prompt, _ = chat.prompt("say something long")
    inputs = chat.processor(text=[prompt])
    with torch.inference_mode():
        out = chat.model.generate(
            **inputs, max_new_tokens=8, do_sample=False, eos_token_id=chat.stop_token_ids
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) >= 3, "greedy answer too short to test stopping"
    stopper = ChatModel(chat.model, chat.processor, chat.template)
    stopper.stop_token_ids = [*chat.stop_token_ids, new[2]]
    if new[2] in new[:2]:
        pytest.skip("the third token already occurs earlier")
    answer = stopper.generate("say something long", max_new_tokens=8)
    assert answer == tokenizer.decode(new[:3], skip_special_tokens=True).strip()
    assert answer != tokenizer.decode(new, skip_special_tokens=True).strip()
    assert "".join(stopper.stream("say something long", max_new_tokens=8)).strip() == answer


def test_sampling_kwargs_reach_generate(chat: ChatModel) -> None:
    torch.manual_seed(0)
    sampled = {chat.generate("hello", max_new_tokens=6, temperature=5.0) for _ in range(4)}
    assert len(sampled) > 1  # a very hot temperature samples different answers
    assert chat.generate("hello", max_new_tokens=6, temperature=0) == chat.generate("hello", max_new_tokens=6)


def test_live_model_and_bad_image(tiny_components: dict[str, Path], tmp_path: Path) -> None:
    from mllm.data.errors import BadRecordError

    vision, llm = tiny_components["clip-vision"], tiny_components["llama"]
    model = MllmForConditionalGeneration.from_components(vision, llm, connector="mlp").eval()
    processor = MllmProcessor.from_components(str(vision), str(llm), model.config.num_image_tokens)
    chat = ChatModel(model, processor)  # the tokenizer's own chat template
    assert isinstance(chat.generate("hi", max_new_tokens=3), str)
    with pytest.raises(BadRecordError, match="does not exist"):
        chat.generate("what is it?", images=[tmp_path / "missing.png"])
