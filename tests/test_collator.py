"""MllmCollator: padding, masks, pixel_values order, skipped pairs."""

from __future__ import annotations

import pytest
import torch

from mllm.data.collator import MllmCollator, PackingCollator


def _sample(ids, labels, n_images=0, fill=0.0, skipped=()):
    s = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": "x", "skipped": list(skipped)}
    if n_images:
        s["pixel_values"] = torch.full((n_images, 3, 4, 4), fill)
    return s


SAMPLES = [
    _sample([5, 6, 7], [-100, 6, 7], n_images=1, fill=1.0),
    _sample([8, 9], [-100, 9], skipped=[("missing_image", "r9")]),
    _sample([1, 2, 3, 4], [-100, -100, 3, 4], n_images=2, fill=2.0),
]


def test_right_padding_masks_and_ignores_pad():
    batch = MllmCollator(pad_token_id=0)(SAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100], [-100, -100, 3, 4]]
    assert batch["skipped"] == [("missing_image", "r9")]


def test_left_padding_and_multiple_of():
    batch = MllmCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=8)(SAMPLES)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"][1].tolist() == [0] * 6 + [8, 9]
    assert batch["attention_mask"][1].tolist() == [0] * 6 + [1, 1]
    assert batch["labels"][1].tolist() == [-100] * 7 + [9]


def test_pixel_values_concatenated_in_batch_order():
    pv = MllmCollator(pad_token_id=0)(SAMPLES)["pixel_values"]
    assert pv.shape == (3, 3, 4, 4)
    assert pv[:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]
    assert "pixel_values" not in MllmCollator(pad_token_id=0)([SAMPLES[1]])


def test_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        MllmCollator(pad_token_id=0, padding_side="middle")


def test_packing_layout():
    batch = PackingCollator()(SAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # the first token of every sample is never a target (no prediction across samples)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 3, 4]]
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["pixel_values"].shape[0] == 3 and batch["skipped"] == [("missing_image", "r9")]
    assert SAMPLES[1]["labels"].tolist() == [-100, 9]  # inputs untouched
    with pytest.raises(ValueError, match="max_length"):
        PackingCollator(max_length=8)(SAMPLES)
