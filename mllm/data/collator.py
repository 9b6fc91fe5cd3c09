"""Batch samples of `SupervisedDataset`: pad them (`MllmCollator`) or pack them into one row
(`PackingCollator`).

Packing relies on transformers' packed-sequence support (``masking_utils.create_causal_mask`` ->
``find_packed_sequence_indices``): with ``position_ids`` that restart at 0 for each sample and
*no* ``attention_mask``, sdpa / eager / flex build a block-diagonal causal mask, and
flash-attention turns the same ``position_ids`` into ``cu_seqlens``. transformers only does this
when no KV cache is passed, so the packed batch carries ``use_cache=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mllm.data.templates import IGNORE_INDEX

__all__ = ["MllmCollator", "PackingCollator"]


def _skipped(samples: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return [pair for s in samples for pair in s.get("skipped", ())]


def _cat_images(samples: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
    """Every sample's images, in batch order (= placeholder order): ``pixel_values`` [N_img, 3, H, W]
    or cached ``image_features`` [N_img, T_vis, D_vis]."""
    parts = [s[key] for s in samples if s.get(key) is not None and len(s[key])]
    return torch.cat(parts) if parts else None


def _add_images(out: dict[str, Any], samples: Sequence[dict[str, Any]]) -> None:
    for key in ("pixel_values", "image_features"):
        images = _cat_images(samples, key)
        if images is not None:
            out[key] = images


class MllmCollator:
    """Pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100; mask the padding.

    Output: ``input_ids``/``attention_mask``/``labels`` [B, T], ``pixel_values`` when any sample has
    images, and ``skipped`` (the ``(reason, record_id)`` pairs of the samples; pop it before forward).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        self.pad_token_id = pad_token_id  # the tokenizer's pad id (MllmProcessor sets pad = eos if missing)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of  # round T up, e.g. 8 for tensor cores

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(samples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            input_ids[row, cols] = sample["input_ids"]
            labels[row, cols] = sample["labels"]
            attention_mask[row, cols] = 1
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        _add_images(out, samples)
        out["skipped"] = _skipped(samples)
        return out


class PackingCollator:
    """Pack samples into rows with per-sample ``position_ids``: ``[R, T_row]``.

    The batch is a list of rows (`PackedDataset` items: lists of samples) or a flat list of samples
    (one row). Rows shorter than the longest are padded with ``pad_token_id``, labels -100 and
    position ids that restart at 0, so the padding is a block of its own that no sample attends to.

    The model shifts labels by one inside the loss, so the logit at sample k's last token would be
    trained to predict sample k+1's first token; that label is set to -100, which makes the packed
    loss equal, token by token, to the unpacked one. No ``attention_mask`` is returned (see the
    module docstring); ``use_cache=False`` is part of the batch.
    """

    def __init__(self, max_length: int | None = None, pad_token_id: int = 0):
        self.max_length = max_length  # refuse rows longer than this (None: no check)
        self.pad_token_id = pad_token_id  # fills rows shorter than the batch's longest

    def _row(self, samples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels, positions = [], [], []
        for sample in samples:
            n = len(sample["input_ids"])
            sample_labels = sample["labels"].clone()
            sample_labels[0] = IGNORE_INDEX  # never predicted from the previous sample
            ids.append(sample["input_ids"])
            labels.append(sample_labels)
            positions.append(torch.arange(n, dtype=torch.long))
        total = sum(len(x) for x in ids)
        if self.max_length is not None and total > self.max_length and len(samples) > 1:
            raise ValueError(f"packed row of {total} tokens exceeds max_length={self.max_length}.")
        return torch.cat(ids), torch.cat(labels), torch.cat(positions)

    def __call__(self, batch: Sequence[Any]) -> dict[str, Any]:
        rows = [list(r) for r in batch] if batch and isinstance(batch[0], (list, tuple)) else [list(batch)]
        built = [self._row(row) for row in rows]
        longest = max(len(ids) for ids, _, _ in built)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, (ids, row_labels, positions) in enumerate(built):
            n = len(ids)
            input_ids[r, :n], labels[r, :n], position_ids[r, :n] = ids, row_labels, positions
            position_ids[r, n:] = torch.arange(longest - n)  # padding: a block of its own
        samples = [s for row in rows for s in row]
        out: dict[str, Any] = {
            "input_ids": input_ids,  # [R, T_row]
            "labels": labels,  # [R, T_row]
            "position_ids": position_ids,  # [R, T_row], 0.. per sample
            "use_cache": False,
        }
        _add_images(out, samples)
        out["skipped"] = _skipped(samples)
        return out
