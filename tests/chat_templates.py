"""Chat-template structures of the LLM families users fine-tune, written out as jinja (nothing downloaded).

Each is the structure of the family's Hub template (roles, separators, where whitespace and the
end-of-turn token go, default system prompts, the errors it raises), trimmed of tool-calling
branches. ``FAMILIES`` names each with the special tokens its tokenizer has and the token that must
close every assistant message. `tokenizer_for` builds a byte-level BPE or a word-level tokenizer
with those tokens, so tests see both kinds of offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from scripts.build_tiny_components import build_tokenizer, tokenizer_corpus

__all__ = ["FAMILIES", "TOKENIZER_KINDS", "Family", "tokenizer_for"]

# meta-llama/Llama-2-7b-chat-hf: a space before the answer and one before </s>; <<SYS>> in the first turn.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.1: [INST] markers are plain text; "answer</s> [INST] ..."; no system role.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct: contents trimmed, <|eot_id|> right after.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct: a system header with dates always, the user's system text after it.
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _chatml(default_system: str) -> str:
    """Qwen2 / Qwen2.5 / SmolLM2: ChatML with a default system prompt when the chat has none."""
    return (
        "{%- for message in messages %}"
        "{%- if loop.first and messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


QWEN25 = _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
SMOLLM2 = _chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face")

# microsoft/Phi-3-mini-4k-instruct: <|end|>\n after every message; EOS at the very end without a
# generation prompt (so a prefix rendered without one is not a prefix of the whole chat).
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# google/gemma-2b-it: the assistant is "model", contents trimmed, no system role.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Vicuna v1.1 (community template of lmsys/vicuna-*-v1.5): "USER: q ASSISTANT: answer</s>".
VICUNA_V11 = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{% set system_message = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
    "{% set loop_messages = messages %}{% endif %}{{ bos_token + system_message }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'].strip() }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'].strip() + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

# ChatML whose assistant turns sit in {% generation %} blocks (as TRL's and SmolLM3's templates do).
CHATML_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The template of the bug report: a space before every end token and after it.
SPACED = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One chat-template family: its jinja, its tokenizer's special tokens, and the token that must
    close each assistant message."""

    name: str
    chat_template: str
    end_token: str  # the end-of-turn token supervised after every assistant message
    bos_token: str | None
    eos_token: str
    specials: tuple[str, ...] = ()  # further special tokens of the tokenizer
    system: bool = True  # the template accepts a system turn
    tokens: dict[str, str] = field(default_factory=dict)


FAMILIES: tuple[Family, ...] = (
    Family("llama2", LLAMA2, "</s>", "<s>", "</s>"),
    Family("mistral_v01", MISTRAL_V01, "</s>", "<s>", "</s>", system=False),
    Family(
        "llama3",
        LLAMA3,
        "<|eot_id|>",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
    ),
    Family(
        "llama3.1",
        LLAMA31,
        "<|eot_id|>",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
    ),
    Family("qwen2.5", QWEN25, "<|im_end|>", None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>")),
    Family("smollm2", SMOLLM2, "<|im_end|>", "<|im_start|>", "<|im_end|>", ("<|endoftext|>",)),
    Family(
        "phi3",
        PHI3,
        "<|end|>",
        "<s>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    Family(
        "gemma", GEMMA, "<end_of_turn>", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), system=False
    ),
    Family("vicuna_v1.1", VICUNA_V11, "</s>", "<s>", "</s>"),
    Family("chatml_generation", CHATML_GENERATION, "<|im_end|>", None, "<|im_end|>", ("<|im_start|>",)),
    Family(
        "spaced",
        SPACED,
        "<|end|>",
        None,
        "<|endoftext|>",
        ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
    ),
)

TOKENIZER_KINDS = ("bpe", "word")


def _special_tokens(family: Family) -> list[str]:
    names = [family.bos_token, family.eos_token, *family.specials, "<unk>", "<pad>"]
    return list(dict.fromkeys(n for n in names if n))


def tokenizer_for(family: Family, kind: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer with ``family``'s special tokens and template: byte-level BPE (``bpe``,
    offsets that carry the space before a word) or word-level (``word``, whitespace never a token)."""
    corpus = tokenizer_corpus(seed=0, lines=300)
    specials = _special_tokens(family)
    named = {
        "bos_token": family.bos_token,
        "eos_token": family.eos_token,
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    named = {k: v for k, v in named.items() if v}
    extra = [s for s in specials if s not in named.values()]
    if kind == "bpe":
        tokenizer = build_tokenizer(corpus, specials, 400, family.chat_template, **named)
    elif kind == "word":
        split = pre_tokenizers.Whitespace().pre_tokenize_str
        words = sorted({word for line in corpus for word, _ in split(line)} - set(specials))
        vocab = {token: i for i, token in enumerate([*specials, *words])}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
        tokenizer.chat_template = family.chat_template
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}")
    tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    return tokenizer
