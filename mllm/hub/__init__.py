"""Share a run: export to a folder plain transformers loads, write its model card, push it to the Hub.

`export(run, output, to="llava"|"remote-code"|"mllm")` and `push(run, repo_id, ...)`; the command
line is ``mllm export`` and ``mllm push``. Names load on first use: importing `mllm.hub` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mllm.lazy import lazy_attributes

if TYPE_CHECKING:
    from mllm.hub.card import model_card
    from mllm.hub.exporter import EXPORT_FORMATS, export
    from mllm.hub.upload import PushResult, push

__all__ = ["EXPORT_FORMATS", "PushResult", "export", "model_card", "push"]

_LAZY = {
    "EXPORT_FORMATS": "mllm.hub.exporter",
    "export": "mllm.hub.exporter",
    "model_card": "mllm.hub.card",
    "PushResult": "mllm.hub.upload",
    "push": "mllm.hub.upload",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
