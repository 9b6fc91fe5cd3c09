"""Supervision on the chat templates of real LLM families, with byte-level BPE and word-level tokenizers.

For random multi-turn conversations, exactly each assistant message and the end-of-turn token that
closes it are supervised: nothing of system or user turns, no image token, no next-turn header,
whatever whitespace the template puts before the end token (Llama-2's ``answer </s>``).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm.data.formats import Turn
from mllm.data.templates import IGNORE_INDEX, _encode, end_of_turn_token_ids, render, render_and_mask
from mllm.models.processing_mllm import ensure_image_token
from tests.chat_templates import FAMILIES, TOKENIZER_KINDS, Family, tokenizer_for

WORDS = (
    "red green blue circle square two 3 yes no the is a of left top image what how many shape , . ? !".split()
)
CASES = [(family, kind) for family in FAMILIES for kind in TOKENIZER_KINDS]
IDS = [f"{family.name}-{kind}" for family, kind in CASES]


@pytest.fixture(scope="module")
def tokenizers():
    """(family name, kind) -> tokenizer with ``<image>`` added, built once."""
    out = {}
    for family, kind in CASES:
        tokenizer = tokenizer_for(family, kind)
        ensure_image_token(tokenizer, "<image>")
        out[family.name, kind] = tokenizer
    return out


def _text(draw, min_words: int = 1) -> str:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=min_words, max_size=6))
    separator = draw(st.sampled_from([" ", " ", "\n"]))
    return separator.join(words)


@st.composite
def conversations(draw, system: bool) -> tuple[Turn, ...]:
    turns: list[Turn] = []
    if system and draw(st.booleans()):
        turns.append(Turn("system", _text(draw)))
    rounds = draw(st.integers(min_value=1, max_value=3))
    for index in range(rounds):
        question = _text(draw)
        if index == 0 and draw(st.booleans()):
            question = draw(st.sampled_from(["<image>\n" + question, question + "\n<image>"]))
        turns += [Turn("user", question), Turn("assistant", _text(draw))]
    return tuple(turns)


def supervised_runs(turns, tokenizer) -> tuple[str, list[tuple[str, int]]]:
    """The rendered text and, per run of consecutive supervised tokens, its text and last token id."""
    ids, labels = render_and_mask(turns, tokenizer, None)
    text = render(turns, tokenizer, None).text
    encoded_ids, offsets = _encode([text], tokenizer)[0]
    assert list(encoded_ids) == ids
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    runs: list[tuple[str, int]] = []
    start = None
    for index, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            runs.append((text[offsets[start][0] : offsets[index - 1][1]], ids[index - 1]))
            start = None
    return text, runs


def check_supervision(turns: tuple[Turn, ...], family: Family, tokenizer) -> None:
    text, runs = supervised_runs(turns, tokenizer)
    answers = [t.content for t in turns if t.role == "assistant"]
    assert len(runs) == len(answers), (text, runs)
    end_id = tokenizer.convert_tokens_to_ids(family.end_token)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for (run, last_id), answer in zip(runs, answers):
        # The answer as the template wrote it (some strip it), whitespace, then the end token.
        pattern = r"\s*" + re.escape(answer.strip()) + r"\s*" + re.escape(family.end_token)
        assert re.fullmatch(pattern, run), (run, answer, text)
        assert last_id == end_id
    ids, labels = render_and_mask(turns, tokenizer, None)
    assert all(label != image_id for label in labels)


@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_random_conversations_supervise_each_answer_and_its_end_token(family, kind, tokenizers):
    tokenizer = tokenizers[family.name, kind]

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(conversations(system=family.system))
    def check(turns):
        check_supervision(turns, family, tokenizer)

    check()


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_whitespace_before_the_end_token_is_supervised_with_it(kind, tokenizers):
    """The bug report: ``<|assistant|> 6 <|end|>`` left ``<|end|>`` at -100 and the model never stopped."""
    family = next(f for f in FAMILIES if f.name == "spaced")
    tokenizer = tokenizers["spaced", kind]
    turns = (Turn("user", "<image>\nhow many?"), Turn("assistant", "6"))
    _, runs = supervised_runs(turns, tokenizer)
    assert [re.sub(r"\s+", " ", run).strip() for run, _ in runs] == ["6 <|end|>"]
    assert runs[0][1] == tokenizer.convert_tokens_to_ids(family.end_token)


def test_generation_blocks_come_from_transformers_assistant_mask(tokenizers):
    """With ``{% generation %}`` the spans are the template's own: what transformers marks."""
    tokenizer = tokenizers["chatml_generation", "bpe"]
    turns = (
        Turn("user", "what shape?"),
        Turn("assistant", "a red circle"),
        Turn("user", "yes?"),
        Turn("assistant", "no"),
    )
    messages = [{"role": t.role, "content": t.content} for t in turns]
    marked = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels = render_and_mask(turns, tokenizer, None)
    assert ids == marked["input_ids"]
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in marked["assistant_masks"]]


def test_a_role_the_template_refuses_is_a_clear_error(tokenizers):
    tokenizer = tokenizers["gemma", "bpe"]
    turns = (Turn("system", "be brief"), Turn("user", "hi"), Turn("assistant", "ok"))
    with pytest.raises(ValueError, match="chat template refused.*System role not supported"):
        render_and_mask(turns, tokenizer, None)


def test_the_next_turns_header_never_closes_an_answer():
    """A template with no end-of-turn token: the next ``<|user|>`` header is not supervised, and a
    warning says the model cannot learn to stop."""
    family = Family(
        "no_end",
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "<|user|>",
        None,
        "<|endoftext|>",
        ("<|user|>", "<|assistant|>"),
    )
    tokenizer = tokenizer_for(family, "bpe")
    turns = (Turn("user", "what?"), Turn("assistant", "red"), Turn("user", "and?"), Turn("assistant", "blue"))
    _, runs = supervised_runs(turns, tokenizer)
    assert [run.strip() for run, _ in runs] == ["red", "blue"]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_generation_stops_on_the_supervised_end_token(family, tokenizers):
    """`end_of_turn_token_ids` is what generation stops on: the end token first, then EOS."""
    tokenizer = tokenizers[family.name, "bpe"]
    ids = end_of_turn_token_ids(tokenizer, None)
    assert ids[0] == tokenizer.convert_tokens_to_ids(family.end_token)
    assert tokenizer.eos_token_id in ids


def test_generation_prompt_tokens_are_headers_even_when_they_share_a_prefix_with_eos(tokenizers):
    """Phi-3 ends a chat with <|endoftext|> and prompts with <|assistant|>: both start with "<|", so a
    character-wise common prefix cuts into the header; it is still known as a header (never an end)."""
    from mllm.data.templates import _ChatRenderer, _special_tokens

    tokenizer = tokenizers["phi3", "bpe"]
    chat = _ChatRenderer(tokenizer, [{"role": "user", "content": "hi"}])
    assert chat.header_tokens(_special_tokens(tokenizer)) == frozenset({"<|assistant|>"})
