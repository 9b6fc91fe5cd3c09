"""The model card of an export: Hub metadata, usage that works for that export, recipes, evaluation.

Written with huggingface_hub's `ModelCard` / `ModelCardData`. The recipe of each stage comes from
the run record (`mllm.run_dir.RunRecord.config`, secrets already masked), following ``init_from``
back to earlier stages that are still on disk; the evaluation table from the ``metrics.json`` files
that `mllm eval` writes under ``RUN/eval/*/``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from mllm.run_dir import RunRecord, is_run_dir, read_record

__all__ = ["DEFAULT_QUESTION", "eval_results", "model_card", "stage_records", "usage_snippet"]

DEFAULT_QUESTION = "Describe the image."
_LIBRARY = {"llava": "transformers", "remote-code": "transformers", "mllm": "mllm"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt", ".tsv")
_SHOWN_TUNING = ("tune_vision", "tune_connector", "tune_llm", "lora_r", "lora_alpha")


def _is_hub_id(name: str | None) -> bool:
    """True for ``owner/name`` that is not a local path (a local component is not a Hub base model)."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return False
    return not name.endswith(_DATA_SUFFIXES)


def stage_records(run: str | os.PathLike) -> list[tuple[Path, RunRecord]]:
    """The run's record and those of the earlier stages it started from (``init_from``), oldest first."""
    chain: list[tuple[Path, RunRecord]] = []
    path: Path | None = Path(run)
    while path is not None and is_run_dir(path) and all(path.resolve() != p.resolve() for p, _ in chain):
        record = read_record(path)
        chain.append((path, record))
        previous = record.config.get("init_from")
        path = Path(previous) if previous else None
    return chain[::-1]


def eval_results(run: str | os.PathLike) -> list[tuple[str, str, float]]:
    """(task, metric, value) from each ``RUN/eval/<task>/metrics.json`` of `mllm eval`, numbers only."""
    rows = []
    for file in sorted(Path(run).glob("eval/*/metrics.json")):
        try:
            metrics = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(metrics, dict):
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append((file.parent.name, str(name), float(value)))
    return rows


def _prompt_code(processor: Any, template: str | None, image_token: str) -> str:
    """The lines that build ``prompt``: the processor's chat template when the run used it, else the
    literal prompt mllm's recorded template renders (what the model saw in training)."""
    if template in (None, "auto") and processor.chat_template:
        return (
            'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]\n'
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        )
    if template in (None, "auto"):
        return f"prompt = {image_token + chr(10)!r} + question  # the LLM has no chat template\n"
    from mllm.inference.generate import build_generation_prompt

    marker = "\x00QUESTION\x00"
    rendered = build_generation_prompt(f"{image_token}\n{marker}", processor.tokenizer, template)
    before, _, after = rendered.partition(marker)
    return f"prompt = {before!r} + question + {after!r}  # mllm template `{template}`\n"


def usage_snippet(to: str, model_id: str, processor: Any, template: str | None, image_token: str) -> str:
    """Python that loads the export ``model_id`` and answers a question about an image."""
    remote = ", trust_remote_code=True" if to == "remote-code" else ""
    lines = [
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        *(["", "import mllm  # registers the `mllm` model type (pip install mllm)"] if to == "mllm" else []),
        "",
        f"model_id = {model_id!r}",
        'image_path = "image.jpg"',
        f"question = {DEFAULT_QUESTION!r}",
        "",
        f"processor = AutoProcessor.from_pretrained(model_id{remote})",
        f"model = AutoModelForImageTextToText.from_pretrained(model_id{remote})",
    ]
    code = "\n".join(lines) + "\n" + _prompt_code(processor, template, image_token)
    code += (
        'inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, '
        'add_special_tokens=False, return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )
    return code


def _component(name: str) -> str:
    return (
        f"[`{name}`](https://huggingface.co/{name})" if _is_hub_id(name) else f"`{Path(name).name}` (local)"
    )


def _stage_section(index: int, path: Path, record: RunRecord) -> str:
    config = dict(record.config)
    tuning = ", ".join(f"{k}={record.tuning[k]}" for k in _SHOWN_TUNING if k in record.tuning)
    data = config.get("data_path")
    lines = [f"### Stage {index}: `{path.name}`", "", f"- tuning: {tuning}"]
    if data:
        data = str(data)
        hub = _is_hub_id(data)
        lines.append(
            f"- data: [`{data}`](https://huggingface.co/datasets/{data})"
            if hub
            else f"- data: `{Path(data).name}`"
        )
    for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "template"):
        if config.get(key) not in (None, ""):
            lines.append(f"- {key}: `{config[key]}`")
    if record.interrupted:
        lines.append(
            f"- **stopped early** by {record.interrupted.get('signal')} at step {record.interrupted.get('step')}"
        )
    if config:
        recipe = yaml.safe_dump(config, sort_keys=True, allow_unicode=True).rstrip()
        lines += ["", "<details><summary>recipe</summary>", "", "```yaml", recipe, "```", "", "</details>"]
    return "\n".join(lines)


def model_card(
    run: str | os.PathLike,
    *,
    to: str,
    model_id: str,
    processor: Any,
    model_config: Any,
    license: str = "other",
    datasets: list[str] | None = None,
) -> ModelCard:
    """The card of the export of run dir ``run`` in format ``to``, loadable as ``model_id``."""
    stages = stage_records(run)
    record = stages[-1][1]
    template = record.config.get("template")
    if datasets is None:
        datasets = sorted(
            {str(r.config["data_path"]) for _, r in stages if _is_hub_id(r.config.get("data_path"))}
        )
    base_models = [n for n in (record.vision_tower, record.model_name_or_path) if _is_hub_id(n)]
    data = ModelCardData(
        pipeline_tag="image-text-to-text",
        library_name=_LIBRARY[to],
        base_model=base_models or None,
        license=license,
        datasets=datasets or None,
        tags=["mllm", "image-text-to-text", "vision-language", *(["llava"] if to == "llava" else [])],
    )
    connector = model_config.connector_type
    if connector == "mlp":
        connector = f"mlp (depth {model_config.connector_depth}, {model_config.connector_hidden_act})"
    elif connector == "qformer":
        connector = f"Q-Former ({model_config.num_query_tokens} queries)"
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    how = {
        "llava": "transformers' native `LlavaForConditionalGeneration` layout: plain `transformers` loads it",
        "remote-code": "its own modelling code in this repo: load it with `trust_remote_code=True`",
        "mllm": "mllm's own layout: load it where `mllm` is installed",
    }[to]
    body = [
        f"# {name}",
        "",
        f"A vision-language model trained with mllm in {len(stages)} stage(s), exported in {how}.",
        "",
        "## Usage",
        "",
        "```python",
        usage_snippet(to, model_id, processor, template, model_config.image_token).rstrip(),
        "```",
        "",
        "## Model",
        "",
        "| part | value |",
        "|---|---|",
        f"| vision tower | {_component(record.vision_tower)} |",
        f"| connector | {connector} |",
        f"| LLM | {_component(record.model_name_or_path)} |",
        f"| image tokens per image | {model_config.num_image_tokens} |",
        f"| vision feature layer | {model_config.vision_feature_layer} ({model_config.vision_feature_select_strategy}) |",
        "",
        "## Training",
        "",
        *[_stage_section(i, p, r) + "\n" for i, (p, r) in enumerate(stages, start=1)],
        "## Evaluation",
        "",
    ]
    rows = eval_results(run)
    if rows:
        body += ["| task | metric | value |", "|---|---|---|"]
        body += [f"| {task} | {metric} | {value:.4g} |" for task, metric, value in rows]
    else:
        body.append("No `mllm eval` results were found next to the run.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
