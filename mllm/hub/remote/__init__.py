"""The code files a ``remote-code`` export writes into its folder (`mllm.hub.remote_code`).

They need only ``transformers`` and ``torch`` and load with ``trust_remote_code=True`` from the
exported folder; they mirror `mllm.models` (same weight names, same forward) without importing
mllm. mllm copies these files; it never imports or executes them itself.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REMOTE_FILES"]

REMOTE_FILES = tuple(
    Path(__file__).with_name(name)
    for name in ("configuration_mllm_remote.py", "modeling_mllm_remote.py", "processing_mllm_remote.py")
)
