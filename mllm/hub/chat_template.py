"""A chat template that accepts transformers-style content parts, for exported processors.

mllm's processor flattens ``[{"type": "image"}, {"type": "text", "text": ...}]`` into one string
(`mllm.messages.flatten_content`: parts joined with newlines, each image part the placeholder)
before the LLM's own template renders it. An exported processor has no mllm code, so the same
flattening is written in Jinja in front of the LLM's template: both give the same prompt.
"""

from __future__ import annotations

__all__ = ["accepting_content_parts"]

_FLATTEN = """{%- set _mllm = namespace(messages=[]) -%}
{%- for _m in messages -%}
{%- if _m['content'] is string -%}
{%- set _mllm.messages = _mllm.messages + [_m] -%}
{%- else -%}
{%- set _parts = namespace(items=[]) -%}
{%- for _p in _m['content'] -%}
{%- if _p['type'] == 'text' -%}
{%- set _parts.items = _parts.items + [_p['text']] -%}
{%- elif _p['type'] in ['image', 'image_url'] -%}
{%- set _parts.items = _parts.items + [IMAGE_TOKEN] -%}
{%- endif -%}
{%- endfor -%}
{%- set _mllm.messages = _mllm.messages + [{'role': _m['role'], 'content': _parts.items | join('\\n')}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = _mllm.messages -%}
"""


def accepting_content_parts(template: str | None, image_token: str) -> str | None:
    """``template`` (the LLM's Jinja chat template) preceded by the flattening of content parts."""
    if template is None:
        return None
    return _FLATTEN.replace("IMAGE_TOKEN", repr(image_token)) + template
