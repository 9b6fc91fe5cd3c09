"""The evaluation tasks, one file each; importing this package registers them in ``TASKS``."""

from __future__ import annotations

from mllm.evaluation.loop import TASKS
from mllm.evaluation.tasks.caption import CaptionTask
from mllm.evaluation.tasks.mcq import McqTask
from mllm.evaluation.tasks.vqa import VqaTask
from mllm.evaluation.tasks.yesno import YesNoTask

__all__ = ["TASKS", "CaptionTask", "McqTask", "VqaTask", "YesNoTask"]
