"""lmms-eval's model ``mllm``: any `mllm train` output dir evaluated on lmms-eval's tasks.

    pip install -e ".[lmms]"            # or scripts/setup.sh --dev (lmms-eval without its heavy deps)
    python -m lmms_eval --model mllm --model_args pretrained=RUN_DIR --tasks TASK --batch_size 8

lmms-eval finds the model through the ``lmms_eval.models`` entry point of this package
(setup.cfg), which names :func:`manifest`. ``--model_args`` takes ``pretrained`` (the run dir, a
final save or a ``checkpoint-N``), ``max_new_tokens`` (when the task's ``generation_kwargs`` give
none; default 256), ``dtype`` (``float32``, ``bfloat16``, ``float16``; default bfloat16 on CUDA,
float32 elsewhere), ``template`` (default: the one the run was trained with), ``load_in_4bit``;
``--device`` and ``--batch_size`` are lmms-eval's own options.

Two forms, as lmms-eval has them (its ``lmms_eval.api.model.lmms`` interface):

- :class:`MllmChatLmms` (the default, lmms-eval's chat form): ``generate_until`` answers the
  messages of the task's ``doc_to_messages`` (lmms-eval builds them from ``doc_to_visual`` and
  ``doc_to_text`` when the task has none);
- :class:`MllmLmms` (``--force_simple``): ``generate_until`` answers ``doc_to_text`` with the images of
  ``doc_to_visual``, and ``loglikelihood`` scores continuations, so lmms-eval's ``multiple_choice`` and
  ``loglikelihood`` tasks (which its chat form does not build) run too.

Answers come from the path `mllm eval` uses (`mllm.inference.api.ChatModel`, hence
`mllm.inference.generate.generate_answers`): the prompt rendered with the run's chat template, each
image an ``<image>`` placeholder where the messages put it (before the question when the text holds
none: LLaVA's ``<image>\\n{question}``), batched greedy decoding stopped at the template's end-of-turn
token. Requests are answered in the order lmms-eval gives them, ``--batch_size`` at a time, so a task
and `mllm eval` on the same questions with the same batch size ask the same batches and get the same
answers. The task's ``until`` strings cut the answer where they first occur (lmms-eval's semantics);
``temperature`` > 0 samples and 0 is greedy, whatever ``do_sample`` says (lmms-eval's rule); other
``generation_kwargs`` than :data:`GENERATION_KWARGS` are ignored, with one warning each.
``generate_until_multi_round`` is refused with `NotImplementedError`. Images only: a video or audio
part raises `ValueError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

__all__ = ["GENERATION_KWARGS", "MODEL_ID", "MllmChatLmms", "MllmLmms", "cut_at_stops", "manifest"]

logger = logging.getLogger(__name__)

MODEL_ID = "mllm"  # the name lmms-eval's --model takes
LMMS_IMAGE_TOKEN = "<image>"  # the placeholder lmms-eval tasks write in their text
GENERATION_KWARGS = (  # task generation_kwargs handed to `model.generate` (besides until, max_new_tokens)
    "temperature",
    "do_sample",
    "top_p",
    "top_k",
    "num_beams",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
)
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")  # dropped when decoding is greedy
_DTYPES = ("float32", "bfloat16", "float16")  # model_args dtype (auto: bfloat16 on CUDA, else float32)


def manifest() -> Any:
    """The payload of the ``lmms_eval.models`` entry point (a ``ModelManifest``): ``--model mllm`` is
    :class:`MllmChatLmms`, ``--model mllm --force_simple`` is :class:`MllmLmms`."""
    # imported here: lmms_eval.models loads its entry points while it is itself being imported
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path=f"{__name__}.{MllmLmms.__name__}",
        chat_class_path=f"{__name__}.{MllmChatLmms.__name__}",
    )


def _until(gen_kwargs: dict[str, Any]) -> list[str]:
    until = gen_kwargs.get("until")
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
        return [u for u in until if u]
    raise ValueError(f"generation_kwargs `until` must be a string or a list of strings, got {until!r}")


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops``, stripped."""
    end = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:end].strip()


class MllmLmms(lmms):
    """lmms-eval's simple form: prompts from ``doc_to_text`` + ``doc_to_visual``; generation and
    log-likelihood."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        device: str | None = None,
        dtype: str | None = None,
        template: str | None = None,
        load_in_4bit: bool = False,
        max_batch_size: int | None = None,  # lmms-eval's --max_batch_size, for --batch_size auto: unused
    ) -> None:
        super().__init__()
        from accelerate import PartialState

        from mllm.inference.api import ChatModel

        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported by the mllm model; give a number.")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}.")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        self.max_new_tokens = int(max_new_tokens)
        if dtype not in (None, "auto", *_DTYPES):
            raise ValueError(f"dtype `{dtype}` is not supported; choose one of: auto, {', '.join(_DTYPES)}.")
        state = PartialState()
        if state.num_processes > 1:  # `accelerate launch -m lmms_eval`: one model per process
            device = str(state.device)
            self._rank, self._world_size = state.process_index, state.num_processes
        self.pretrained = str(pretrained)
        self.chat = ChatModel.from_pretrained(
            self.pretrained,
            device=device,
            dtype=None if dtype in (None, "auto") else str(dtype),
            template=template,
            load_in_4bit=bool(load_in_4bit),
        )
        self._ignored: set[str] = set()

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self.chat.model.parameters()).device

    @property
    def tokenizer(self) -> Any:
        return self.chat.processor.tokenizer

    # -- requests ----------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _text(self, text: str) -> str:
        """A task's text with lmms-eval's ``<image>`` written as the model's image token."""
        token = self.chat.processor.image_token
        return text if token == LMMS_IMAGE_TOKEN else text.replace(LMMS_IMAGE_TOKEN, token)

    @staticmethod
    def _visuals(doc_to_visual: Callable[[Any], Any] | None, doc: Any) -> list[Any]:
        """The images of a document (a PIL image or an image path each)."""
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        if visuals is None:
            return []
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        for visual in visuals:
            if not hasattr(visual, "size") and not isinstance(visual, str):
                raise ValueError(
                    f"the mllm model takes images only; the task gave a {type(visual).__name__}."
                )
        return visuals

    def _gen_settings(self, gen_kwargs: dict[str, Any]) -> tuple[int, list[str], dict[str, Any]]:
        """``(max_new_tokens, until, kwargs for generate)`` of a task's ``generation_kwargs``."""
        kwargs = {k: v for k, v in gen_kwargs.items() if k in GENERATION_KWARGS and v is not None}
        for key in sorted(set(gen_kwargs) - {*GENERATION_KWARGS, "until", "max_new_tokens"} - self._ignored):
            logger.warning("mllm model: ignoring generation_kwargs %r=%r", key, gen_kwargs[key])
            self._ignored.add(key)
        # lmms-eval's rule: temperature > 0 samples, temperature 0 is greedy whatever do_sample says
        if "temperature" in kwargs:
            sampling = float(kwargs["temperature"]) > 0
        else:
            sampling = bool(kwargs.get("do_sample", False))
        kwargs["do_sample"] = sampling
        if not sampling:
            for key in _SAMPLING_ONLY:
                kwargs.pop(key, None)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        return max_new_tokens, _until(gen_kwargs), kwargs

    def _answer(
        self, conversations: list[Any], images: list[list[Any]] | None, gen_kwargs: list[dict[str, Any]]
    ) -> list[str]:
        """Answers in request order: runs of requests with the same generation settings, ``batch_size``
        at a time."""
        answers: list[str] = [""] * len(conversations)
        groups: dict[str, list[int]] = {}
        for i, kwargs in enumerate(gen_kwargs):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
        with tqdm(total=len(conversations), disable=self.rank != 0, desc="mllm answering") as bar:
            for indices in groups.values():
                max_new_tokens, until, kwargs = self._gen_settings(dict(gen_kwargs[indices[0]]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts = self.chat.generate_batch(
                        [conversations[i] for i in batch],
                        None if images is None else [images[i] for i in batch],
                        max_new_tokens=max_new_tokens,
                        batch_size=len(batch),
                        **kwargs,
                    )
                    for i, text in zip(batch, texts):
                        answers[i] = cut_at_stops(text, until)
                    bar.update(len(batch))
        return answers

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)`` requests."""
        conversations, images, gen_kwargs = [], [], []
        for request in requests:
            context, kwargs, doc_to_visual, doc_id, task, split = request.args
            conversations.append(self._text(str(context)))
            images.append(self._visuals(doc_to_visual, self._doc(task, split, doc_id)))
            gen_kwargs.append(dict(kwargs or {}))
        return self._answer(conversations, images, gen_kwargs)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt), whether greedy decoding gives the continuation)`` of
        ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)`` requests.

        The prompt is the generation prompt of ``context`` (with the document's images); the
        continuation is appended to it as written (lmms-eval puts the task's ``target_delimiter``,
        a space by default, in front of it) and its tokens are those of prompt + continuation past the
        prompt's, as in lm-evaluation-harness.
        """
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="mllm log-likelihood"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, list):  # doc_to_target may give the reference list
                continuation = continuation[0]
            visuals = self._visuals(doc_to_visual, doc)
            results.append(self._continuation_logprob(self._text(str(context)), str(continuation), visuals))
        return results

    def _continuation_logprob(
        self, context: str, continuation: str, visuals: list[Any]
    ) -> tuple[float, bool]:
        from mllm.inference.generate import _device_of

        prompt, images = self.chat.prompt(context, visuals)
        processor, model = self.chat.processor, self.chat.model
        inputs = processor(text=[prompt + continuation], images=[images] if images else None)
        inputs = inputs.to(_device_of(model))
        n_prompt = self.chat.prompt_length(prompt)
        target = inputs["input_ids"][0, n_prompt:]  # [C]
        if target.numel() == 0:
            raise ValueError(f"continuation {continuation!r} adds no token to the prompt.")
        with torch.inference_mode():
            logits = model(**inputs).logits  # [1, P + C, V]
        logprobs = torch.log_softmax(logits[0, n_prompt - 1 : -1].float(), dim=-1)  # [C, V]
        total = float(logprobs.gather(1, target[:, None]).sum())
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        for image in images:
            image.close()
        return total, greedy

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the mllm model does not implement generate_until_multi_round (lmms-eval's multi-round "
            "tasks); it runs generate_until and loglikelihood tasks."
        )


class MllmChatLmms(MllmLmms):
    """lmms-eval's chat form: prompts from the task's ``doc_to_messages``."""

    is_simple = False

    def _messages(self, raw: Any) -> list[dict[str, Any]]:
        """lmms-eval's messages (``{"type": "image", "url": PIL or path}`` parts) as mllm's."""
        messages = []
        for message in raw:
            message = message.model_dump() if hasattr(message, "model_dump") else dict(message)
            content = message.get("content", "")
            if isinstance(content, list):
                parts = []
                for part in content:
                    part = part.model_dump() if hasattr(part, "model_dump") else dict(part)
                    kind = part.get("type")
                    if kind == "text":
                        parts.append({"type": "text", "text": self._text(str(part.get("text", "")))})
                    elif kind == "image":
                        parts.append({"type": "image", "image": part.get("url", part.get("image"))})
                    else:
                        raise ValueError(f"the mllm model takes images and text only; got a {kind!r} part.")
                content = parts
            else:
                content = self._text(str(content))
            messages.append({"role": message["role"], "content": content})
        return messages

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to ``(context, doc_to_messages, generation_kwargs, doc_id, task, split)`` requests."""
        conversations, gen_kwargs = [], []
        for request in requests:
            _context, doc_to_messages, kwargs, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            raw = doc_to_messages(doc) if callable(doc_to_messages) else doc_to_messages
            conversations.append(self._messages(raw))
            gen_kwargs.append(dict(kwargs or {}))
        return self._answer(conversations, None, gen_kwargs)
