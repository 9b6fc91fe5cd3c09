"""The generation API: a loaded model, its processor and the chat template it was trained with.

    from mllm.inference import ChatModel

    chat = ChatModel.from_pretrained("runs/stage2")            # any `mllm train` output dir
    chat.generate("<image>\\nwhat color is the circle?", images=["scene.png"])
    chat.generate([{"role": "user", "content": [{"type": "image", "image": "scene.png"},
                                               {"type": "text", "text": "describe it"}]}])
    for piece in chat.stream("hello"):                        # text-only turns work too
        print(piece, end="", flush=True)
    chat.generate_batch(["<image>\\nq1", "<image>\\nq2"], images=[["a.png"], ["b.png"]])

Prompts are rendered with the template recorded in the run (``mllm_run.json``'s ``template``; the
tokenizer's own chat template when none was recorded) and generation stops on that template's
end-of-turn token (`mllm.data.templates.end_of_turn_token_ids`) as well as EOS. Decoding is greedy
unless ``temperature`` > 0 (or ``do_sample=True``) is given; every other keyword goes to
``model.generate``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mllm.data.formats import Turn

__all__ = ["ChatModel", "Conversation", "to_turns"]

Conversation = str | Sequence[Turn] | Sequence[dict[str, Any]]
"""One user prompt, a list of `Turn`, or chat messages (``role`` / ``content``, content a string or a
list of ``{"type": "image", "image": PATH_OR_PIL}`` / ``{"type": "text", "text": ...}`` parts)."""


def to_turns(conversation: Any, image_token: str) -> tuple[list[Turn], list[Any]]:
    """``(turns, inline images)`` of a conversation (see `Conversation`)."""
    from mllm.messages import flatten_messages

    if isinstance(conversation, str):
        return [Turn("user", conversation)], []
    items = list(conversation)
    if all(isinstance(t, Turn) for t in items):
        return items, []
    flat, images = flatten_messages(items, image_token)
    return [Turn(str(m["role"]), str(m["content"])) for m in flat], images


def _load(ref: Any) -> Image.Image:
    from mllm.data.images import load_image

    return load_image(ref, record_id="prompt", source="generate")


@dataclass
class ChatModel:
    """A model ready to answer: ``model`` (`MllmForConditionalGeneration`, peft-wrapped or not),
    ``processor`` (`MllmProcessor`) and ``template`` (a `mllm.data.templates` name; None = the
    tokenizer's chat template)."""

    model: Any
    processor: Any
    template: str | None = None
    context_length: int | None = None  # tokens the model may see (prompt + answer); None = unknown

    def __post_init__(self) -> None:
        from mllm.data.templates import end_of_turn_token_ids

        self.stop_token_ids: list[int] = end_of_turn_token_ids(self.processor.tokenizer, self.template)
        if self.context_length is None:
            self.context_length = _context_length(self.model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: str | None = None,
        load_in_4bit: bool = False,
        template: str | None = None,
        merge_lora: bool = False,
    ) -> ChatModel:
        """Load any `mllm train` output dir (full, LoRA + connector, merged, QLoRA). ``load_in_4bit``
        quantizes the LLM to 4 bit (bitsandbytes, CUDA); a QLoRA run loads in 4 bit anyway.
        ``device`` defaults to CUDA when available, ``dtype`` to bfloat16 there and float32 elsewhere;
        ``template`` None takes the one the run recorded."""
        import torch

        from mllm import run_dir
        from mllm.models.loading import load_model_and_processor

        record = run_dir.read_record(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else None
        if dtype is None:
            dtype = "bfloat16" if device is not None and str(device).startswith("cuda") else "float32"
        if template is None:
            template = (record.config or {}).get("template")
        model, processor = load_model_and_processor(
            path,
            dtype=getattr(torch, dtype),
            merge_lora=merge_lora,
            device=None if load_in_4bit else device,  # bitsandbytes places a 4-bit model itself
            quantize=True if load_in_4bit else None,
        )
        if load_in_4bit and device is not None:
            for module in (_base(model).vision_tower, _base(model).connector):
                module.to(device)
        max_length = (record.config or {}).get("model_max_length")
        return cls(model, processor, template, int(max_length) if max_length else None)

    # -- prompts ------------------------------------------------------------------------------
    def prompt(self, conversation: Any, images: Sequence[Any] | None = None) -> tuple[str, list[Image.Image]]:
        """The prompt text (up to the assistant's answer) and the decoded images of a conversation.

        Images come inline in the messages and/or from ``images``; when no turn holds an ``<image>``
        placeholder, one per image goes before the last user turn's text (LLaVA's layout)."""
        from mllm.inference.generate import build_generation_prompt

        token = self.processor.image_token
        turns, inline = to_turns(conversation, token)
        refs = [*inline, *(images or [])]
        if refs and not any(token in t.content for t in turns):
            last = turns[-1]
            turns[-1] = Turn(last.role, "\n".join([*[token] * len(refs), last.content]))
        text = build_generation_prompt(turns, self.processor.tokenizer, self.template)
        return text, [_load(r) for r in refs]

    def prompt_length(self, text: str) -> int:
        """Tokens of a rendered prompt, every ``<image>`` counted as the model's image-token run."""
        tokenizer = self.processor.tokenizer
        expanded = self.processor.expand_image_tokens(text)
        return len(tokenizer(expanded, add_special_tokens=False)["input_ids"])

    def _gen_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(gen_kwargs)
        temperature = kwargs.get("temperature")
        if temperature is not None and temperature <= 0:
            kwargs.pop("temperature")
            kwargs.setdefault("do_sample", False)
        elif temperature is not None:
            kwargs.setdefault("do_sample", True)
        return kwargs

    # -- generation ---------------------------------------------------------------------------
    def generate_batch(
        self,
        conversations: Sequence[Any],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        **gen_kwargs: Any,
    ) -> list[str]:
        """One answer per conversation (``images``: one list per conversation, or None)."""
        from mllm.inference.generate import generate_answers

        if images is not None and len(images) != len(conversations):
            raise ValueError(
                f"got {len(conversations)} conversations but {len(images)} image lists; give one list each."
            )
        prompts, loaded = [], []
        for i, conversation in enumerate(conversations):
            text, imgs = self.prompt(conversation, None if images is None else images[i])
            prompts.append(text)
            loaded.append(imgs)
        return generate_answers(
            self.model,
            self.processor,
            prompts,
            loaded,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_token_ids=self.stop_token_ids,
            **self._gen_kwargs(gen_kwargs),
        )

    def generate(
        self,
        conversation: Any,
        images: Sequence[Any] | None = None,
        *,
        max_new_tokens: int = 256,
        **gen_kwargs: Any,
    ) -> str:
        """The answer to one conversation (a prompt string, `Turn`s or chat messages)."""
        return self.generate_batch(
            [conversation], [list(images or [])], max_new_tokens=max_new_tokens, batch_size=1, **gen_kwargs
        )[0]

    def stream(
        self,
        conversation: Any,
        images: Sequence[Any] | None = None,
        *,
        max_new_tokens: int = 256,
        **gen_kwargs: Any,
    ) -> Iterator[str]:
        """The answer as text pieces, as they are generated (transformers' `TextIteratorStreamer`)."""
        text, imgs = self.prompt(conversation, images)
        yield from self.stream_prompt(text, imgs, max_new_tokens=max_new_tokens, **gen_kwargs)

    def stream_prompt(
        self, text: str, images: list[Image.Image], *, max_new_tokens: int = 256, **gen_kwargs: Any
    ) -> Iterator[str]:
        """`stream` for an already rendered prompt and decoded images."""
        import torch
        from transformers import TextIteratorStreamer

        from mllm.inference.generate import _device_of, _stop_ids

        tokenizer = self.processor.tokenizer
        inputs = self.processor(text=[text], images=[images] if images else None).to(_device_of(self.model))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {"do_sample": False, "num_beams": 1, **self._gen_kwargs(gen_kwargs)}
        kwargs["eos_token_id"] = _stop_ids(self.model, self.stop_token_ids)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **kwargs)
            except BaseException as err:  # handed to the caller's thread below
                failure.append(err)
                streamer.end()

        self.model.eval()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        first = True
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), not piece.strip()
            if piece:
                yield piece
        thread.join()
        if failure:
            raise failure[0]


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _context_length(model: Any) -> int | None:
    config = getattr(_base(model), "config", None)
    text = getattr(config, "text_config", None)
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None
