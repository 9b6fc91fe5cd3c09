"""The one error type for a bad training/eval record, with a fixed set of reasons.

Every loader raises :class:`BadRecordError` with one of :data:`BAD_DATA_REASONS`, so
``bad_data=skip`` can count skipped records by reason and ``bad_data=strict`` can stop on
the first one with a message that names the record and the file it came from.
"""

from __future__ import annotations

__all__ = ["BAD_DATA_REASONS", "BadRecordError"]

BAD_DATA_REASONS: tuple[str, ...] = (
    "bad_schema",
    "empty_conversation",
    "bad_turn_order",
    "image_count_mismatch",
    "missing_image",
    "unreadable_image",
    "zero_size_image",
    "path_escapes_root",
    "no_supervised_tokens",
    "too_long",
)


class BadRecordError(ValueError):
    """A record that cannot be trained on; ``reason`` is one of :data:`BAD_DATA_REASONS`.

    ``str(err)`` reads ``record 'abc' (data.json#12): missing_image: /x/y.png does not exist``.
    """

    def __init__(self, reason: str, record_id: str, source: str, detail: str) -> None:
        if reason not in BAD_DATA_REASONS:
            raise ValueError(f"unknown bad-data reason {reason!r}; choose from {', '.join(BAD_DATA_REASONS)}")
        self.reason = reason
        self.record_id = record_id
        self.source = source
        self.detail = detail
        super().__init__(f"record {record_id!r} ({source}): {reason}: {detail}")

    def __reduce__(self) -> tuple[type[BadRecordError], tuple[str, str, str, str]]:
        # keeps the error picklable (DataLoader workers send exceptions across processes)
        return (type(self), (self.reason, self.record_id, self.source, self.detail))
