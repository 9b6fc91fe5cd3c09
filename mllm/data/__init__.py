"""The data layer: records -> templates -> dataset -> collator / sampler (see DESIGN.md, "Data flow").

Names are imported on first use, so `import mllm.data.formats` (the data tools) does not pull torch
in through `mllm.data.collator` or `mllm.data.dataset`.
"""

from __future__ import annotations

from mllm.lazy import lazy_attributes

_LAZY = {
    "MllmCollator": "mllm.data.collator",
    "PackingCollator": "mllm.data.collator",
    "SkipReport": "mllm.data.dataset",
    "SupervisedDataset": "mllm.data.dataset",
    "build_dataset": "mllm.data.dataset",
    "expand_image_tokens": "mllm.data.dataset",
    "write_skip_report": "mllm.data.dataset",
    "BAD_DATA_REASONS": "mllm.data.errors",
    "BadRecordError": "mllm.data.errors",
    "IMAGE_PLACEHOLDER": "mllm.data.formats",
    "ImageRef": "mllm.data.formats",
    "Record": "mllm.data.formats",
    "Turn": "mllm.data.formats",
    "check_record_structure": "mllm.data.formats",
    "load_records": "mllm.data.formats",
    "normalize_record": "mllm.data.formats",
    "read_raw_records": "mllm.data.formats",
    "record_to_llava": "mllm.data.formats",
    "save_json": "mllm.data.formats",
    "save_jsonl": "mllm.data.formats",
    "load_image": "mllm.data.images",
    "to_rgb": "mllm.data.images",
    "ModalityLengthGroupedSampler": "mllm.data.sampler",
    "modality_length_grouped_indices": "mllm.data.sampler",
    "IGNORE_INDEX": "mllm.data.templates",
    "TEMPLATES": "mllm.data.templates",
    "RenderedChat": "mllm.data.templates",
    "Template": "mllm.data.templates",
    "get_template": "mllm.data.templates",
    "render": "mllm.data.templates",
    "render_and_mask": "mllm.data.templates",
    "render_and_mask_batch": "mllm.data.templates",
    "show_supervision": "mllm.data.templates",
}

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


__getattr__ = lazy_attributes(__name__, _LAZY)
