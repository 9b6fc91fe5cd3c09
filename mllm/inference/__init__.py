"""Inference: batched generation, the `ChatModel` API, chat and stage-level beam search."""

from __future__ import annotations

from mllm.inference.api import ChatModel, to_turns
from mllm.inference.generate import build_generation_prompt, generate_answers

__all__ = ["ChatModel", "build_generation_prompt", "generate_answers", "to_turns"]
