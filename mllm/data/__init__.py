"""The data layer: records -> templates -> dataset -> collator / sampler (see DESIGN.md, "Data flow")."""

from __future__ import annotations

from mllm.data.collator import MllmCollator, PackingCollator
from mllm.data.dataset import (
    SkipReport,
    SupervisedDataset,
    build_dataset,
    expand_image_tokens,
    write_skip_report,
)
from mllm.data.errors import BAD_DATA_REASONS, BadRecordError
from mllm.data.formats import (
    IMAGE_PLACEHOLDER,
    ImageRef,
    Record,
    Turn,
    check_record_structure,
    load_records,
    normalize_record,
    read_raw_records,
    record_to_llava,
    save_json,
    save_jsonl,
)
from mllm.data.images import load_image, to_rgb
from mllm.data.sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices
from mllm.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    RenderedChat,
    Template,
    get_template,
    render,
    render_and_mask,
    render_and_mask_batch,
    show_supervision,
)

__all__ = [
    "BAD_DATA_REASONS",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "TEMPLATES",
    "BadRecordError",
    "ImageRef",
    "MllmCollator",
    "ModalityLengthGroupedSampler",
    "PackingCollator",
    "Record",
    "RenderedChat",
    "SkipReport",
    "SupervisedDataset",
    "Template",
    "Turn",
    "build_dataset",
    "check_record_structure",
    "expand_image_tokens",
    "get_template",
    "load_image",
    "load_records",
    "modality_length_grouped_indices",
    "normalize_record",
    "read_raw_records",
    "record_to_llava",
    "render",
    "render_and_mask",
    "render_and_mask_batch",
    "save_json",
    "save_jsonl",
    "show_supervision",
    "to_rgb",
    "write_skip_report",
]
