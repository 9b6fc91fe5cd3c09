"""Trainer callbacks: save-and-stop on SIGTERM / Ctrl-C, and the per-epoch skipped-records report."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from types import FrameType

import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mllm.io import give_ordinary_permissions

__all__ = ["GracefulStopCallback", "SkippedRecordsCallback", "SKIPPED_RECORDS"]

logger = logging.getLogger(__name__)

SKIPPED_RECORDS = "skipped_records.json"


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current step, write a checkpoint, stop training cleanly.

    The handlers are installed when training begins and the previous ones restored when it ends,
    so nothing changes at import or construction. A second signal falls through to the previous
    handler (e.g. Ctrl-C twice interrupts at once).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.requested: int | None = None  # the signal received, if any
        self._previous: dict[int, Callable | int | None] = {}

    @property
    def requested_name(self) -> str | None:
        """``SIGTERM`` / ``SIGINT`` once a stop was requested (it stays set after training ends), else None."""
        return None if self.requested is None else signal.Signals(self.requested).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            return
        self.requested = signum
        logger.warning(
            "received %s: saving a checkpoint and stopping after this step", signal.Signals(signum).name
        )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.requested = None
        try:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.requested is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


class SkippedRecordsCallback(TrainerCallback):
    """At each epoch end (and at train end), gather the skips of every rank, log the counts and write
    them to ``output_dir/skipped_records.json`` (atomically, main process only)."""

    def __init__(self, report) -> None:
        self.report = report  # mllm.data.dataset.SkipReport

    def _gather(self) -> None:
        """Every rank learns every rank's batch-time skips (a collective: all ranks call it)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[list[tuple[str, str]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.report.seen)
        for pairs in gathered:
            self.report.update(pairs or [])

    def _write(self, args: TrainingArguments, state: TrainerState) -> None:
        self._gather()
        if not state.is_world_process_zero:
            return
        counts = self.report.counts
        logger.info(
            "epoch %.2f: %d skipped record(s) %s", state.epoch or 0.0, sum(counts.values()), dict(counts)
        )
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, SKIPPED_RECORDS)
        self.report.write(path)
        give_ordinary_permissions(path)  # its writer (formats.save_json, mkstemp) makes it 0600

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._write(args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._write(args, state)
