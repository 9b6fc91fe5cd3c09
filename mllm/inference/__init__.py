"""Inference: batched generation (and, beside it, chat and stage-level beam search)."""

from __future__ import annotations

from mllm.inference.generate import build_generation_prompt, generate_answers

__all__ = ["build_generation_prompt", "generate_answers"]
