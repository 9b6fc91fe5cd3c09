"""Batched greedy generation for evaluation and scripts, and the prompt up to the assistant's answer.

Prompts are padded on the LEFT so that every row's last prompt token sits at the same position and
new tokens are appended right after it; `generate` derives position ids from the attention mask, so
a padded row generates the same tokens as the row alone (greedy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mllm.data.formats import Turn

__all__ = ["build_generation_prompt", "generate_answers"]


def build_generation_prompt(
    turns: str | Sequence[Turn], tokenizer: PreTrainedTokenizerBase, template: str | None
) -> str:
    """The chat prompt of a conversation that ends with a user turn, rendered up to where the
    assistant's answer starts.

    ``turns`` is the conversation so far (system, user and assistant turns, the last one the user's)
    or, for one user turn, its text. ``template=None`` (or ``"auto"``) uses the tokenizer's own chat
    template with ``add_generation_prompt=True``; a named template (``mllm.data.templates.TEMPLATES``)
    is rendered with an empty assistant turn appended and cut where that turn's supervised answer
    would begin, so the prompt is exactly the prefix the model saw in training. Trailing spaces are
    dropped with either (``"ASSISTANT: "`` -> ``"ASSISTANT:"``, as LLaVA prompts; ``"<|assistant|> "``
    -> ``"<|assistant|>"``), so the answer's first word keeps the leading-space token it was trained
    with: a prompt ending in a lone space token would ask for the space before the end token.
    """
    from mllm.data.templates import TEMPLATES, render

    conversation = [Turn("user", turns)] if isinstance(turns, str) else list(turns)
    if not conversation or conversation[-1].role != "user":
        raise ValueError("a generation prompt needs turns that end with a user turn.")
    if template in (None, "auto"):
        if not getattr(tokenizer, "chat_template", None):
            named = ", ".join(n for n in TEMPLATES.names() if n != "auto")
            raise ValueError(
                f"the tokenizer has no chat_template, so template=None cannot build the prompt; pass the "
                f"template the model was trained with, one of: {named}."
            )
        messages = [{"role": t.role, "content": t.content} for t in conversation]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt.rstrip(" ")
    rendered = render([*conversation, Turn("assistant", "")], tokenizer, template)
    question = conversation[-1].content
    found = rendered.text.rfind(question) if question else -1  # `plain` drops the question's text
    question_end = found + len(question) if found >= 0 else 0
    if not rendered.spans or rendered.spans[-1][0] < question_end:
        raise ValueError(
            f"template `{template}` marks no assistant span after the last user turn, so the answer start "
            "is unknown."
        )
    return rendered.text[: rendered.spans[-1][0]].rstrip(" ")


def _stop_ids(model: Any, extra: Sequence[int]) -> list[int]:
    """The model's own EOS id(s) and ``extra``, once each."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own_ids = [] if own is None else [own] if isinstance(own, int) else list(own)
    return list(dict.fromkeys([*own_ids, *extra]))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate_answers(
    model: Any,
    processor: Any,
    prompts: list[str],
    images: list[list[Image.Image]],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    stop_token_ids: Sequence[int] | None = None,
    **gen_kwargs: Any,
) -> list[str]:
    """Greedy answers for ``prompts`` (one image list per prompt, in placeholder order).

    Works for `MllmForConditionalGeneration` and a peft-wrapped one. Only the new tokens are decoded,
    special tokens are dropped and whitespace stripped. ``stop_token_ids`` (e.g.
    `mllm.data.templates.end_of_turn_token_ids`: the template's end-of-turn token, which is often not
    EOS) end an answer besides the model's own EOS. ``gen_kwargs`` go to ``model.generate``
    (``use_cache``, ``num_beams``, ...); the default is greedy decoding.
    """
    if len(prompts) != len(images):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(images)} image lists; give one list per prompt."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    tokenizer = processor.tokenizer
    kwargs = {"do_sample": False, "num_beams": 1, **gen_kwargs}
    if stop_token_ids:
        kwargs["eos_token_id"] = _stop_ids(model, stop_token_ids)
    device = _device_of(model)
    answers: list[str] = []
    was_training = model.training
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        model.eval()
        for start in range(0, len(prompts), batch_size):
            batch_prompts = prompts[start : start + batch_size]
            batch_images: Sequence[list[Image.Image]] = images[start : start + batch_size]
            has_images = any(len(group) for group in batch_images)
            inputs = processor(
                text=batch_prompts, images=list(batch_images) if has_images else None, padding=True
            ).to(device)
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, T_new]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers.extend(text.strip() for text in decoded)
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    return answers
