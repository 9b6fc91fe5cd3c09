"""Inference: batched generation, the `ChatModel` API, `mllm chat` and stage-level beam search.

Names load on first use, so `mllm chat --help` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mllm.lazy import lazy_attributes

if TYPE_CHECKING:
    from mllm.inference.api import ChatModel, to_turns
    from mllm.inference.generate import build_generation_prompt, generate_answers
    from mllm.inference.stage_beam import StageBeamSearch

__all__ = ["ChatModel", "StageBeamSearch", "build_generation_prompt", "generate_answers", "to_turns"]

_WHERE = {
    "ChatModel": "mllm.inference.api",
    "to_turns": "mllm.inference.api",
    "build_generation_prompt": "mllm.inference.generate",
    "generate_answers": "mllm.inference.generate",
    "StageBeamSearch": "mllm.inference.stage_beam",
}


__getattr__ = lazy_attributes(__name__, _WHERE)
