"""`attn_implementation`: flash-attention where it can run, else sdpa with a warning naming what is missing.

transformers raises ImportError at load time when ``flash_attention_2`` is asked for without the
flash-attn package or without a CUDA GPU. A recipe written for a GPU box (LLaVA's
``--attn_implementation flash_attention_2``) then fails on a laptop for no reason the user controls
in the recipe; sdpa computes the same attention (packed rows keep their block-diagonal mask), it
only needs more memory on long rows. So the request falls back to sdpa, once, with a warning.
"""

from __future__ import annotations

import importlib.util
import logging

__all__ = ["FLASH_ATTENTION_2", "resolve_attn_implementation"]

logger = logging.getLogger(__name__)

FLASH_ATTENTION_2 = "flash_attention_2"
FALLBACK = "sdpa"


def _flash_attention_2_missing() -> list[str]:
    """What keeps flash_attention_2 from running here (empty when transformers can use it)."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return []
    missing = []
    if importlib.util.find_spec("flash_attn") is None:
        missing.append("the flash-attn package is not installed (pip install 'mllm[gpu]')")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    return missing or [
        "transformers finds no usable flash-attn >= 2.3.3 (is_flash_attn_2_available() is False)"
    ]


def resolve_attn_implementation(requested: str | None) -> str | None:
    """``requested``, or ``sdpa`` (with a warning) for ``flash_attention_2`` where it cannot run.

    Any other value (``sdpa``, ``eager``, ``flex_attention``, None = transformers' default) is
    returned as given; transformers validates it when the model loads.
    """
    if requested != FLASH_ATTENTION_2:
        return requested
    missing = _flash_attention_2_missing()
    if not missing:
        return requested
    logger.warning(
        "attn_implementation=%s needs the flash-attn package and a CUDA GPU, but %s: using %s instead "
        "(same attention, more memory on long rows).",
        FLASH_ATTENTION_2,
        " and ".join(missing),
        FALLBACK,
    )
    return FALLBACK
