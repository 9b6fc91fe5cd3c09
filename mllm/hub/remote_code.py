"""Export with the model's own code: ``auto_map`` modules in the folder, for what Llava cannot express.

The folder holds mllm's weights under their own names (``vision_tower.*``, ``connector.*``,
``language_model.*``), a config of model type ``mllm_remote`` and the three files of
`mllm.hub.remote`, which need only transformers and torch. Users load it with
``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from mllm.hub.chat_template import accepting_content_parts
from mllm.hub.remote import REMOTE_FILES
from mllm.io import atomic_write_json, give_ordinary_permissions
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor

__all__ = ["REMOTE_AUTO_MAP", "REMOTE_MODEL_TYPE", "export_remote_code"]

REMOTE_MODEL_TYPE = "mllm_remote"
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_mllm_remote.MllmRemoteConfig",
    "AutoModel": "modeling_mllm_remote.MllmRemoteForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_mllm_remote.MllmRemoteForConditionalGeneration",
}
_PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_mllm_remote.MllmRemoteProcessor"}


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    atomic_write_json(path, data)


@torch.no_grad()
def export_remote_code(
    model: MllmForConditionalGeneration, processor: MllmProcessor, output: str | os.PathLike
) -> Path:
    """Write ``model`` (merged, unquantised) and ``processor`` with the code that loads them."""
    output = Path(output)
    config = model.config
    model.save_pretrained(output)  # config.json + model.safetensors (+ generation_config.json)
    data = json.loads((output / "config.json").read_text(encoding="utf-8"))
    data.pop("quantization_config", None)
    data.get("text_config", {}).pop("quantization_config", None)
    data.update(
        model_type=REMOTE_MODEL_TYPE,
        architectures=["MllmRemoteForConditionalGeneration"],
        auto_map=REMOTE_AUTO_MAP,
        vision_has_cls=config.vision_has_cls,
        num_image_tokens=config.num_image_tokens,
    )
    atomic_write_json(output / "config.json", data)
    exported = copy.copy(processor)
    exported.chat_template = accepting_content_parts(processor.chat_template, config.image_token)
    exported.save_pretrained(output)
    _edit_json(
        output / "processor_config.json", processor_class="MllmRemoteProcessor", auto_map=_PROCESSOR_AUTO_MAP
    )
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        if (output / name).is_file():
            data = json.loads((output / name).read_text(encoding="utf-8"))
            if data.get("processor_class") == type(processor).__name__:
                _edit_json(output / name, processor_class="MllmRemoteProcessor", auto_map=_PROCESSOR_AUTO_MAP)
    for source in REMOTE_FILES:
        shutil.copyfile(source, output / source.name)
    give_ordinary_permissions(output)
    return output
