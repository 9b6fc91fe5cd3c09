"""Bridges to other tools: ``mllm.integrations.lmms_eval`` is the lmms-eval model (``--model mllm``).

Importing this package imports nothing else; each bridge imports its tool only when it is itself
imported (lmms-eval loads it through its ``lmms_eval.models`` entry point).
"""

from __future__ import annotations

__all__: list[str] = []
