"""`SupervisedDataset`: records -> input_ids, labels (-100 except assistant tokens), pixel_values.

Text is rendered and tokenised once at construction (so ``lengths`` are the real token counts,
image tokens included, for the length-grouped sampler); images are loaded lazily per item.
Follows LLaVA's ``LazySupervisedDataset`` (https://github.com/haotian-liu/LLaVA,
``llava/train/train.py``) with the invariants of DESIGN.md: an image-token run is never cut, a
sample without supervised tokens never reaches the loss, every skip is counted by reason.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mllm.data.errors import BadRecordError
from mllm.data.feature_cache import FeatureCache
from mllm.data.formats import Record, Turn, load_records, save_json
from mllm.data.images import load_image
from mllm.data.sampler import pack_first_fit_decreasing
from mllm.data.templates import IGNORE_INDEX, get_template, render_and_mask_batch
from mllm.models.processing_mllm import MllmProcessor

__all__ = [
    "EmptyDatasetError",
    "PackedDataset",
    "SkipReport",
    "SupervisedDataset",
    "build_dataset",
    "expand_image_tokens",
    "write_skip_report",
]

logger = logging.getLogger(__name__)

BAD_DATA_MODES = ("skip", "strict")
TRUNCATION_MODES = ("drop", "cut_text")
_CHUNK = 2048  # records tokenised per batched tokenizer call


def expand_image_tokens(
    input_ids: np.ndarray, labels: np.ndarray, image_token_id: int, num_image_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Repeat every image token ``num_image_tokens`` times; the copies keep label -100."""
    repeats = np.where(input_ids == image_token_id, num_image_tokens, 1)
    expanded_labels = np.repeat(labels, repeats)
    expanded_labels[np.repeat(input_ids, repeats) == image_token_id] = IGNORE_INDEX
    return np.repeat(input_ids, repeats), expanded_labels


class SupervisedDataset(Dataset):
    """A torch ``Dataset`` of supervised samples; see the module docstring.

    ``bad_data="skip"`` drops bad records and counts them in ``skipped`` (reason -> count; the
    errors themselves are in ``errors``); ``"strict"`` raises the first ``BadRecordError``.
    ``truncation="drop"`` drops samples longer than ``model_max_length`` (reason ``too_long``);
    ``"cut_text"`` cuts the text after the last image run instead, and drops (``too_long``) when the
    images do not fit or no supervised token survives the cut.
    """

    def __init__(
        self,
        records: Sequence[Record],
        processor: MllmProcessor,
        template: str | None,
        model_max_length: int | None,
        bad_data: str = "skip",
        truncation: str = "drop",
        feature_cache: FeatureCache | None = None,
    ) -> None:
        if bad_data not in BAD_DATA_MODES:
            raise ValueError(f"bad_data must be one of {BAD_DATA_MODES}, got {bad_data!r}.")
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}.")
        self.processor = processor
        self.template = template  # template name (None = the tokenizer's chat template)
        self.model_max_length = model_max_length  # longest sample in tokens, image tokens included
        self.bad_data = bad_data
        self.truncation = truncation
        self.feature_cache = feature_cache  # cached tower features replace pixel_values (None: load images)
        self.image_token_id = processor.image_token_id
        self.num_image_tokens = processor.num_image_tokens
        self.skipped: Counter[str] = Counter()  # reason -> records dropped at construction
        self.errors: list[BadRecordError] = []  # those records' errors, in data order
        self.untruncated_lengths: list[int] = []  # token counts of every renderable record, before any cut
        self.lengths: list[int] = []  # token counts of the kept samples, image tokens included
        self.modality: list[bool] = []  # True where the kept sample has an image
        self._records: list[Record] = []
        self._ids: list[np.ndarray] = []  # [T_text] int32, one token per <image>
        self._labels: list[np.ndarray] = []
        _check_template(processor, template)
        for start in range(0, len(records), _CHUNK):
            self._add_chunk(records[start : start + _CHUNK])
        if self.skipped:
            logger.warning(
                "dropped %d of %d records: %s", sum(self.skipped.values()), len(records), dict(self.skipped)
            )
        if feature_cache is not None:
            missing = feature_cache.missing(ref for r in self._records for ref in r.images)
            if missing:
                raise ValueError(
                    f"{len(missing)} image(s) of the data are not in the feature cache `{feature_cache.root}` "
                    f"(first: {missing[0]}); rerun `mllm cache-features` with this recipe."
                )

    # -- construction -----------------------------------------------------------------------
    def _add_chunk(self, chunk: Sequence[Record]) -> None:
        tokenizer = self.processor.tokenizer
        try:
            encoded = render_and_mask_batch(
                [r.turns for r in chunk], tokenizer, self.template, return_numpy=True
            )
        except ValueError:  # one record the template cannot render: find it, record by record
            encoded = []
            for record in chunk:
                try:
                    encoded.append(render_and_mask_batch([record.turns], tokenizer, self.template, True)[0])
                except ValueError as err:
                    encoded.append(BadRecordError("bad_schema", record.id, record.source, str(err)))
        for record, item in zip(chunk, encoded):
            try:
                if isinstance(item, BadRecordError):
                    raise item
                ids, labels = self._fit(record, np.asarray(item[0], np.int32), np.asarray(item[1], np.int32))
            except BadRecordError as err:
                if self.bad_data == "strict":
                    raise
                self.skipped[err.reason] += 1
                self.errors.append(err)
                continue
            self._records.append(record)
            self._ids.append(ids)
            self._labels.append(labels)
            self.lengths.append(len(ids) + len(record.images) * (self.num_image_tokens - 1))
            self.modality.append(bool(record.images))

    def _fit(self, record: Record, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Check one tokenised record and apply truncation; raise ``BadRecordError`` to drop it."""

        def bad(reason: str, detail: str) -> BadRecordError:
            return BadRecordError(reason, record.id, record.source, detail)

        image_positions = np.flatnonzero(ids == self.image_token_id)
        n_images = len(record.images)
        if len(image_positions) != n_images:
            raise bad(
                "image_count_mismatch",
                f"{len(image_positions)} image token(s) after rendering but {n_images} image(s)",
            )
        if not (labels != IGNORE_INDEX).any():
            raise bad("no_supervised_tokens", "no assistant token to learn from after rendering")
        extra = n_images * (self.num_image_tokens - 1)  # tokens added by expanding each <image>
        length = len(ids) + extra
        self.untruncated_lengths.append(length)
        limit = self.model_max_length
        if limit is None or length <= limit:
            return ids, labels
        if self.truncation == "drop":
            raise bad("too_long", f"{length} tokens (image tokens included) > model_max_length={limit}")
        images_end = int(image_positions[-1]) + 1 + extra if n_images else 0  # expanded end of the last run
        if images_end > limit:
            raise bad("too_long", f"the image tokens end at {images_end} > model_max_length={limit}")
        keep = limit - extra  # text tokens kept, image tokens counted once
        ids, labels = ids[:keep], labels[:keep]
        if not (labels != IGNORE_INDEX).any():
            raise bad("too_long", f"cutting to model_max_length={limit} leaves no supervised token")
        return ids, labels

    # -- items ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[Record]:
        """The kept records, in item order."""
        return self._records

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample; in skip mode a record whose image fails to load is replaced by the next one
        that loads (index + 1, + 2, ... wrapping), and reported in ``item["skipped"]``."""
        skipped: list[tuple[str, str]] = []
        for attempt in range(len(self)):
            j = (index + attempt) % len(self)
            try:
                item = self._item(j)
            except BadRecordError as err:
                if self.bad_data == "strict":
                    raise
                skipped.append((err.reason, err.record_id))
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(f"no record of the dataset loads; skipped: {Counter(r for r, _ in skipped)}")

    def _item(self, j: int) -> dict[str, Any]:
        record = self._records[j]
        ids, labels = expand_image_tokens(
            self._ids[j], self._labels[j], self.image_token_id, self.num_image_tokens
        )
        item: dict[str, Any] = {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),  # [T]
            "labels": torch.from_numpy(labels.astype(np.int64)),  # [T]
            "id": record.id,
        }
        if record.images and self.feature_cache is not None:
            # a file that did not load when the cache was built is skipped, as it is without the cache
            for ref in record.images:
                bad = self.feature_cache.bad_reason(ref)
                if bad is not None:
                    raise BadRecordError(bad[0], record.id, record.source, bad[1])
            item["image_features"] = self.feature_cache.features(record.images)  # [N_img, T_vis, D_vis]
        elif record.images:
            images = [load_image(ref, record_id=record.id, source=record.source) for ref in record.images]
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            item["pixel_values"] = pixel_values  # [N_img, 3, H, W]
        return item


def _check_template(processor: MllmProcessor, template: str | None) -> None:
    """Fail before the first record on a template problem that would hit every record."""
    get_template(template)
    render_and_mask_batch([(Turn("user", "hi"), Turn("assistant", "ok"))], processor.tokenizer, template)


class SkipReport:
    """Aggregates skips: construction-time counts plus the ``item["skipped"]`` lists of batches.

    A record skipped in several epochs, workers or ranks counts once per reason. The
    ``(reason, record_id)`` pairs seen in batches are written with the counts, so a resumed run
    (`restore`) and the other ranks of a distributed run (`update` with their `seen`) add up instead
    of starting over.
    """

    def __init__(self, counts: Counter[str] | None = None) -> None:
        self._counts: Counter[str] = Counter(counts or {})
        self._seen: set[tuple[str, str]] = set()

    def update(self, skipped: Iterable[tuple[str, str]]) -> None:
        """Add ``(reason, record_id)`` pairs, e.g. a batch's ``skipped`` list."""
        for reason, record_id in skipped:
            if (reason, record_id) not in self._seen:
                self._seen.add((reason, record_id))
                self._counts[reason] += 1

    @property
    def counts(self) -> Counter[str]:
        return Counter(self._counts)

    @property
    def seen(self) -> list[tuple[str, str]]:
        """The batch-time ``(reason, record_id)`` pairs, sorted."""
        return sorted(self._seen)

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Add the batch-time pairs of an earlier report at ``path`` (resume); no file: nothing to add."""
        path = Path(path)
        if not path.is_file():
            return
        try:
            pairs = json.loads(path.read_text(encoding="utf-8")).get("records", [])
            self.update((str(reason), str(record_id)) for reason, record_id in pairs)
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"`{path}` is not a skipped-records report written by mllm: {err}") from err

    def write(self, path: str | os.PathLike[str]) -> None:
        write_skip_report(self._counts, path, records=self.seen)


def write_skip_report(
    counter: Counter[str], path: str | os.PathLike[str], records: list[tuple[str, str]] | None = None
) -> None:
    """Write ``{"total": n, "by_reason": {reason: count}, "records": [[reason, id], ...]}`` to ``path``,
    atomically; ``records`` are the batch-time skips (construction-time ones are recounted on load)."""
    by_reason = {reason: int(n) for reason, n in sorted(counter.items()) if n}
    report: dict[str, Any] = {"total": sum(by_reason.values()), "by_reason": by_reason}
    if records is not None:
        report["records"] = [list(pair) for pair in records]
    save_json(report, path)


class PackedDataset(Dataset):
    """Rows of whole samples of ``dataset``, at most ``budget`` tokens each (image tokens counted):
    item k is the list of samples of row k, which `PackingCollator` packs into one sequence.

    The rows are fixed once (`pack_first_fit_decreasing` over ``dataset.lengths``), so every sample
    is in exactly one row per epoch and the Trainer's sampler (and accelerate's sharding across
    ranks) shuffles and splits rows as it would samples. An image run is never split: samples are
    packed whole.
    """

    def __init__(self, dataset: SupervisedDataset, budget: int) -> None:
        self.dataset = dataset
        self.budget = budget  # tokens per row (packing_max_length)
        self.rows = pack_first_fit_decreasing(dataset.lengths, budget)
        self.lengths = [sum(dataset.lengths[i] for i in row) for row in self.rows]  # tokens per row
        over = sum(1 for row in self.rows if len(row) == 1 and dataset.lengths[row[0]] > budget)
        if over:
            logger.warning(
                "%d sample(s) are longer than packing_max_length=%d: each has a row of its own", over, budget
            )

    @property
    def skipped(self) -> Counter[str]:
        return self.dataset.skipped

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.dataset[i] for i in self.rows[index]]


class EmptyDatasetError(ValueError):
    """No record of a data file survives the checks; the message gives the counts by reason."""


def build_dataset(
    data_path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None,
    processor: MllmProcessor,
    template: str | None,
    model_max_length: int | None,
    bad_data: str = "skip",
    truncation: str = "drop",
    allow_symlinks: bool = False,
    feature_cache: FeatureCache | None = None,
) -> SupervisedDataset:
    """``load_records`` + ``SupervisedDataset``; ``dataset.skipped`` holds the counts of both steps.

    Raises `EmptyDatasetError` (with the skip counts by reason) when no record is left.
    """
    records, skipped = load_records(data_path, image_folder, bad_data, allow_symlinks=allow_symlinks)
    dataset = SupervisedDataset(
        records, processor, template, model_max_length, bad_data, truncation, feature_cache
    )
    dataset.skipped.update(skipped)
    if len(dataset) == 0:
        counts = ", ".join(f"{reason}={n}" for reason, n in sorted(dataset.skipped.items()))
        raise EmptyDatasetError(
            f"no record of `{data_path}` is usable: {sum(dataset.skipped.values())} skipped"
            + (f" ({counts})" if counts else " (the file holds no records)")
            + "; `python -m data_tools.validate` lists them."
        )
    return dataset
