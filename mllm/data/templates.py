"""Chat templates: render turns into one prompt string and mark which tokens the loss supervises.

A template returns the rendered text plus the *character* spans of every assistant message (and
the end-of-turn token that closes it). The whole text is tokenised once and a token is supervised
when its offsets overlap a span, so the mask always matches the tokens that the model sees.
LLaVA's ``preprocess_v1`` instead tokenises each round again and trusts that lengths add up
(https://github.com/haotian-liu/LLaVA, ``llava/train/train.py``), which breaks silently when a
tokeniser merges across round boundaries.

Names (exact): ``plain`` (stage 1, LLaVA ``preprocess_plain``), ``vicuna_v1`` (LLaVA-1.5
``conv_vicuna_v1``), ``llama3``, ``qwen2`` and its alias ``chatml``, and ``auto`` (``None``
means the same): the tokenizer's own ``chat_template``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from jinja2 import TemplateError
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mllm.data.formats import IMAGE_PLACEHOLDER, Turn
from mllm.registry import Registry

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "RenderedChat",
    "Template",
    "close_with_end_of_turn",
    "end_of_turn_token_ids",
    "get_template",
    "render",
    "render_and_mask",
    "render_and_mask_batch",
    "show_supervision",
]

IGNORE_INDEX = -100  # label of every token the loss ignores

logger = logging.getLogger(__name__)

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QWEN2_SYSTEM = "You are a helpful assistant."  # Qwen2's chat template adds it when no system turn is given


@dataclass(frozen=True)
class RenderedChat:
    """The prompt text and the half-open character spans ``[start, end)`` the loss supervises."""

    text: str
    spans: tuple[tuple[int, int], ...]
    unclosed: int = 0  # assistant spans that no end-of-turn token closes (the model cannot learn to stop)


class Template(Protocol):
    def __call__(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> RenderedChat: ...


TEMPLATES: Registry[Template] = Registry("template")


class _Builder:
    """Appends pieces to a string, remembering the spans of the supervised ones."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int]] = []

    def add(self, text: str, supervised: bool = False) -> None:
        if supervised and text:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def build(self) -> RenderedChat:
        return RenderedChat("".join(self.parts), tuple(self.spans))


def _bos(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.bos_token or ""


def _eos(tokenizer: PreTrainedTokenizerBase) -> str:
    if tokenizer.eos_token is None:
        raise ValueError("this template ends assistant turns with EOS, but the tokenizer has no eos_token.")
    return tokenizer.eos_token


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, marker: str) -> str:
    """``marker`` when the tokenizer knows it as one token, else EOS: generation must be able to stop on
    the supervised end-of-turn token, and a marker split into pieces would merge with the next text."""
    ids = tokenizer.convert_tokens_to_ids([marker])
    if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return marker
    return _eos(tokenizer)


@TEMPLATES.register("plain")
def plain(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> RenderedChat:
    """Stage 1 (LLaVA ``preprocess_plain``): the user turn becomes its image placeholders only; the
    assistant turn (the caption) follows directly and ends with EOS. System turns are dropped."""
    out = _Builder()
    out.add(_bos(tokenizer))
    for turn in turns:
        if turn.role == "user":
            out.add(IMAGE_PLACEHOLDER * turn.content.count(IMAGE_PLACEHOLDER))
        elif turn.role == "assistant":
            out.add(turn.content + _eos(tokenizer), supervised=True)
    return out.build()


@TEMPLATES.register("vicuna_v1")
def vicuna_v1(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> RenderedChat:
    """LLaVA-1.5 ``conv_vicuna_v1`` (SeparatorStyle.TWO):
    ``<s>SYSTEM USER: q ASSISTANT: a</s>USER: ...``; a system turn replaces the default prompt."""
    system = " ".join(t.content for t in turns if t.role == "system") or VICUNA_SYSTEM
    out = _Builder()
    out.add(_bos(tokenizer) + system + " ")
    for turn in turns:
        if turn.role == "user":
            out.add(f"USER: {turn.content} ASSISTANT: ")
        elif turn.role == "assistant":
            out.add(turn.content + _eos(tokenizer), supervised=True)
    return out.build()


@TEMPLATES.register("llama3")
def llama3(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> RenderedChat:
    """Llama-3 instruct: ``<|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>``.

    With a tokenizer that lacks ``<|eot_id|>`` as a token, its EOS ends the turns instead."""
    eot = _end_of_turn(tokenizer, "<|eot_id|>")
    out = _Builder()
    out.add(tokenizer.bos_token or "<|begin_of_text|>")
    for turn in turns:
        out.add(f"<|start_header_id|>{turn.role}<|end_header_id|>\n\n")
        out.add(turn.content + eot, supervised=turn.role == "assistant")
    return out.build()


def chatml(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> RenderedChat:
    """Qwen2 / ChatML: ``<|im_start|>ROLE\\nTEXT<|im_end|>\\n``, with Qwen2's default system prompt.

    The ``\\n`` after ``<|im_end|>`` is not supervised (the model stops at ``<|im_end|>``). With a
    tokenizer that lacks ``<|im_end|>`` as a token, its EOS ends the turns instead."""
    end = _end_of_turn(tokenizer, "<|im_end|>")
    out = _Builder()
    if not turns or turns[0].role != "system":
        out.add(f"<|im_start|>system\n{QWEN2_SYSTEM}<|im_end|>\n")
    for turn in turns:
        out.add(f"<|im_start|>{turn.role}\n")
        out.add(turn.content + end, supervised=turn.role == "assistant")
        out.add("\n")
    return out.build()


TEMPLATES.add("qwen2", chatml)
TEMPLATES.add("chatml", chatml)


@TEMPLATES.register("auto")
def auto(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> RenderedChat:
    """The tokenizer's own ``chat_template``; the assistant messages are located in the rendered text.

    A template with ``{% generation %}`` blocks marks them itself: transformers'
    ``return_assistant_tokens_mask`` gives the spans. Otherwise each assistant message is searched
    for after the conversation rendered up to it with ``add_generation_prompt=True`` (when that
    render is a prefix of the full one), else after the previous message. Either way each span is
    then closed with its end-of-turn token (see :func:`close_with_end_of_turn`).
    """
    chat_template = getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise ValueError(
            "the tokenizer has no chat_template, so template=None/'auto' cannot render the chat; pass "
            f"a named template, one of: {', '.join(n for n in TEMPLATES.names() if n != 'auto')}."
        )
    messages = [{"role": t.role, "content": t.content} for t in turns]
    chat = _ChatRenderer(tokenizer, messages)
    text = chat.render(len(messages))
    if _GENERATION_BLOCK.search(chat_template):
        content_spans = _generation_spans(tokenizer, messages, text)
        boundaries: list[int | None] = [None] * len(content_spans)
    else:
        content_spans, boundaries = _locate_assistant_messages(chat, turns, text)
    specials = _special_tokens(tokenizer)
    headers = chat.header_tokens(specials)
    spans = tuple(
        close_with_end_of_turn(text, span, specials, headers, boundary)
        for span, boundary in zip(content_spans, boundaries)
    )
    unclosed = sum(not _ends_with_special(text, span, specials) for span in spans)
    return RenderedChat(text, spans, unclosed)


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _ChatRenderer:
    """Renders prefixes of one conversation with the tokenizer's template, memoised, with template
    errors (a role the template refuses, ...) turned into ``ValueError``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> None:
        self.tokenizer = tokenizer
        self.messages = messages
        self._cache: dict[tuple[int, bool], str] = {}

    def render(self, n: int, add_generation_prompt: bool = False) -> str:
        key = (n, add_generation_prompt)
        if key not in self._cache:
            try:
                self._cache[key] = self.tokenizer.apply_chat_template(
                    self.messages[:n], tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except TemplateError as err:
                raise ValueError(f"the tokenizer's chat template refused the conversation: {err}") from err
        return self._cache[key]

    def header_tokens(self, specials: Sequence[str]) -> frozenset[str]:
        """Special tokens of the generation prompt (``<|im_start|>``, ``<|start_header_id|>``, ...):
        they open the next turn, so they never close an assistant message."""
        first = 1 if self.messages else 0
        try:
            with_prompt, without = self.render(first, True), self.render(first, False)
        except ValueError:
            return frozenset()
        common = len(os.path.commonprefix([with_prompt, without]))
        # A token counts when it ends inside the generation prompt: the character-wise common prefix
        # may end inside one ("<|endoftext|>" and "<|assistant|>" share "<|").
        return frozenset(s for s in specials if with_prompt.find(s, max(0, common - len(s) + 1)) >= 0)


def _locate_assistant_messages(
    chat: _ChatRenderer, turns: Sequence[Turn], text: str
) -> tuple[list[tuple[int, int]], list[int | None]]:
    """Character spans of the assistant messages' content in ``text``, and for each the end of its
    turn where the template shows it (the render up to that message, when it is a prefix of ``text``)."""
    spans: list[tuple[int, int]] = []
    boundaries: list[int | None] = []
    cursor = 0
    for i, turn in enumerate(turns):
        if turn.role == "assistant":
            prefix = chat.render(i, add_generation_prompt=True)
            if text.startswith(prefix):
                cursor = max(cursor, len(prefix))
        content = turn.content if turn.content in text[cursor:] else turn.content.strip()
        start = text.find(content, cursor)
        if start < 0:
            raise ValueError(
                f"the tokenizer's chat template changed the text of turn {i} ({turn.role}), so its span cannot "
                "be found in the rendered prompt; use a named template."
            )
        end = start + len(content)
        if turn.role == "assistant":
            spans.append((start, end))
            boundaries.append(_turn_end(chat, i + 1, text, end))
        cursor = end
    return spans, boundaries


def _turn_end(chat: _ChatRenderer, n: int, text: str, content_end: int) -> int | None:
    """Where the template ends the first ``n`` messages, when that render is a prefix of ``text``."""
    try:
        through = chat.render(n)
    except ValueError:  # a template that refuses a chat ending with an assistant turn
        return None
    return len(through) if text.startswith(through) and len(through) >= content_end else None


def _generation_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str
) -> list[tuple[int, int]]:
    """The character spans that the template's ``{% generation %}`` blocks mark, read from
    transformers' ``return_assistant_tokens_mask`` (one span per run of marked tokens)."""
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except TemplateError as err:
        raise ValueError(f"the tokenizer's chat template refused the conversation: {err}") from err
    offsets = out.encodings[0].offsets
    spans: list[tuple[int, int]] = []
    previous = False
    for marked, (start, end) in zip(out["assistant_masks"], offsets):
        if marked and previous:
            spans[-1] = (spans[-1][0], end)
        elif marked:
            spans.append((start, end))
        previous = bool(marked)
    return [(start, end) for start, end in spans if text[start:end].strip()]


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Every special token but the image placeholder, longest first (so ``<|im_end|>`` wins over a prefix)."""
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False))
    names = {tok for tok in (*tokenizer.all_special_tokens, *added) if tok and tok != IMAGE_PLACEHOLDER}
    return sorted(names, key=len, reverse=True)


def close_with_end_of_turn(
    text: str,
    span: tuple[int, int],
    specials: Sequence[str],
    headers: frozenset[str] = frozenset(),
    boundary: int | None = None,
) -> tuple[int, int]:
    """Extend an assistant message's span over the end-of-turn token that closes it.

    That token is the first special token after the message, past whitespace-only text (Llama-2's
    ``answer </s>``, Phi-3-style ``6 <|end|>``), unless it opens the next turn (a token of the
    generation prompt) or lies past the turn's ``boundary``. The whitespace before it is supervised
    too: the model has to produce it to reach the end token. A span that already ends with a special
    token (a ``{% generation %}`` block that holds it) is kept as it is. With no such token the span
    stays the message alone, and the model cannot learn to stop there (logged once per template).
    """
    start, end = span
    if _ends_with_special(text, span, specials):
        return span
    position = end
    while position < len(text) and text[position].isspace():
        position += 1
    token = next((s for s in specials if text.startswith(s, position)), None)
    if token is None or token in headers or (boundary is not None and position + len(token) > boundary):
        return span
    return start, position + len(token)


def _closing_special(text: str, span: tuple[int, int], specials: Sequence[str]) -> str | None:
    """The special token the span ends with, if any (``specials`` longest first)."""
    start, end = span
    return next((s for s in specials if len(s) <= end - start and text.startswith(s, end - len(s))), None)


def _ends_with_special(text: str, span: tuple[int, int], specials: Sequence[str]) -> bool:
    return _closing_special(text, span, specials) is not None


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase, template: str | None) -> list[int]:
    """Ids of the special tokens that close assistant messages under ``template`` (found by rendering
    a two-turn probe chat), then EOS: what generation should stop on. A template that closes turns
    with ``<|end|>`` or ``<|im_end|>`` while EOS is another token otherwise runs to ``max_new_tokens``."""
    probe = (Turn("user", "hi"), Turn("assistant", "ok"), Turn("user", "and?"), Turn("assistant", "no"))
    rendered = render(probe, tokenizer, template)
    specials = _special_tokens(tokenizer)
    ids: list[int] = []
    for span in rendered.spans:
        token = _closing_special(rendered.text, span, specials)
        if token is not None:
            ids.append(tokenizer.convert_tokens_to_ids(token))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def get_template(name: str | None) -> Template:
    """The template registered as ``name``; ``None`` means ``auto``. Unknown names raise ValueError."""
    return TEMPLATES.get("auto" if name is None else name)


def render(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, template: str | None) -> RenderedChat:
    """Render ``turns`` with ``template`` (see the module docstring for the names)."""
    return get_template(template)(turns, tokenizer)


def _mask(
    rendered: RenderedChat, ids: np.ndarray, offsets: np.ndarray, image_token_id: int | None
) -> np.ndarray:
    """Labels: the token id where the token's characters ``[a, b)`` overlap a supervised span, else -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if not rendered.spans or not len(ids):
        return labels
    spans = np.asarray(rendered.spans, dtype=np.int64)  # [S, 2], sorted, disjoint
    starts, ends = offsets[:, 0], offsets[:, 1]
    k = np.searchsorted(spans[:, 1], starts, side="right")  # first span ending after the token starts
    first = spans[np.minimum(k, len(spans) - 1), 0]
    hit = (k < len(spans)) & (first < ends) & (ends > starts)
    if image_token_id is not None:
        hit &= ids != image_token_id
    labels[hit] = ids[hit]
    return labels


def _image_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    ids = tokenizer.convert_tokens_to_ids([IMAGE_PLACEHOLDER])
    return ids[0] if ids and ids[0] != tokenizer.unk_token_id else None


def _encode(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids [T], offsets [T, 2]) per text, one batched call to the Rust tokenizer (no special tokens added)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("render_and_mask needs a fast tokenizer (it reads the offset mapping).")
    return [
        (np.asarray(e.ids, dtype=np.int64), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
        for e in backend.encode_batch(texts, add_special_tokens=False)
    ]


def render_and_mask_batch(
    conversations: Sequence[Sequence[Turn]],
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    return_numpy: bool = False,
) -> list[tuple[list[int], list[int]]] | list[tuple[np.ndarray, np.ndarray]]:
    """``render_and_mask`` for many conversations, tokenised in one batched (parallel) call;
    ``return_numpy`` gives int64 arrays instead of lists."""
    fn = get_template(template)
    rendered = [fn(turns, tokenizer) for turns in conversations]
    if not rendered:
        return []
    unclosed = sum(r.unclosed for r in rendered)
    if unclosed:
        logger.warning(
            "%d assistant message(s) in %d conversation(s) end with no special token in the chat template, so "
            "no end-of-turn token is supervised after them and the model may not learn to stop.",
            unclosed,
            len(rendered),
        )
    image_id = _image_token_id(tokenizer)
    out = [
        (ids, _mask(r, ids, offsets, image_id))
        for r, (ids, offsets) in zip(rendered, _encode([r.text for r in rendered], tokenizer))
    ]
    if return_numpy:
        return out
    return [(ids.tolist(), labels.tolist()) for ids, labels in out]


def render_and_mask(
    turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, template: str | None
) -> tuple[list[int], list[int]]:
    """Return ``(input_ids, labels)``: labels are -100 except on assistant tokens and the end-of-turn
    token closing each assistant turn. Each ``<image>`` stays one token (always -100); expanding it to
    the model's image-token count is the dataset's job."""
    return render_and_mask_batch([turns], tokenizer, template)[0]


def show_supervision(
    turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, template: str | None, marks: str = "[[]]"
) -> str:
    """The rendered prompt with every run of supervised tokens wrapped in ``marks`` (for debugging)."""
    rendered = render(turns, tokenizer, template)
    ids, offsets = _encode([rendered.text], tokenizer)[0]
    labels = _mask(rendered, ids, offsets, _image_token_id(tokenizer))
    half = len(marks) // 2
    open_mark, close_mark = marks[:half], marks[half:]
    out: list[str] = []
    pos = 0
    inside = False
    for (start, end), label in zip(offsets.tolist(), labels.tolist()):
        supervised = label != IGNORE_INDEX
        if supervised != inside:
            gap = rendered.text[pos:start]
            out.append(gap + open_mark if supervised else close_mark + gap)
            pos = start
            inside = supervised
        out.append(rendered.text[pos:end])
        pos = end
    out.append(rendered.text[pos:] if not inside else close_mark + rendered.text[pos:])
    return "".join(out)
