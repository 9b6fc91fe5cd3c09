"""End to end: with a template that puts a space before its end token, a trained model stops.

The bug report: a chat template rendering ``<|assistant|> 6 <|end|> `` left ``<|end|>``
unsupervised, so the model learned the answers but ran to ``max_new_tokens``. Here the tiny
components get that template, `mllm train` runs a few hundred steps of stage 2 on a colour task
(as a user types it, in a subprocess), and greedy answers must stop on their own and be right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoTokenizer

from tests.chat_templates import SPACED

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
MAX_NEW_TOKENS = 8


def _spaced_llm(components: dict[str, Path], out: Path) -> Path:
    """The tiny Llama with the bug report's template and its special tokens."""
    import shutil

    shutil.copytree(components["llama"], out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = SPACED
    tokenizer.save_pretrained(out)
    return out


def _colour_data(folder: Path, n: int, seed: int) -> Path:
    """LLaVA-format records: a plain coloured image, "what color is it?", the colour's name."""
    import random

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = rng.choice(sorted(COLORS))
        shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLORS[name])
        path = folder / "images" / f"{seed}-{i}.png"
        Image.new("RGB", (48, 48), shade).save(path)
        records.append(
            {
                "id": f"{seed}-{i}",
                "image": f"images/{path.name}",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color is it?"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
    data = folder / f"colours-{seed}.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    return data


def test_trained_answers_stop_and_are_right(tiny_components, tmp_path):
    llm = _spaced_llm(tiny_components, tmp_path / "spaced-llama")
    train = _colour_data(tmp_path / "data", 256, seed=0)
    test = _colour_data(tmp_path / "data", 40, seed=1)
    recipe = {
        "vision_tower": str(tiny_components["clip-vision"]),
        "model_name_or_path": str(llm),
        "connector_type": "mlp",
        "tune_vision": "frozen",
        "tune_connector": "full",
        "tune_llm": "full",
        "data_path": str(train),
        "image_folder": str(tmp_path / "data"),
        "template": None,
        "model_max_length": 128,
        "per_device_train_batch_size": 8,
        "learning_rate": 1.0e-3,
        "max_steps": 250,
        "lr_scheduler_type": "constant",
        "output_dir": str(tmp_path / "run"),
        "save_strategy": "no",
        "logging_steps": 50,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
    }
    recipe_path = tmp_path / "stage2.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mllm", "train", str(recipe_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    from mllm.data.formats import load_records
    from mllm.data.templates import end_of_turn_token_ids
    from mllm.inference.generate import build_generation_prompt
    from mllm.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(tmp_path / "run")
    tokenizer = processor.tokenizer
    records, _ = load_records(test, tmp_path / "data")
    stop = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    prompts = [build_generation_prompt(r.turns[:-1], tokenizer, None) for r in records]
    tokenizer.padding_side = "left"
    inputs = processor(
        text=prompts, images=[[Image.open(r.images[0]).convert("RGB")] for r in records], padding=True
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stop)
    new = output[:, inputs["input_ids"].shape[1] :]
    stopped = [any(t in stop for t in row.tolist()) for row in new]
    answers = [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    right = [a == r.turns[-1].content for a, r in zip(answers, records)]
    print(f"stopped on their own: {sum(stopped)}/{len(stopped)}; exactly right: {sum(right)}/{len(right)}")
    assert all(stopped), [tokenizer.decode(row) for row, s in zip(new, stopped) if not s][:5]
    assert sum(right) / len(right) >= 0.8, list(zip(answers, [r.turns[-1].content for r in records]))
    assert end_of_turn_token_ids(tokenizer, None) == stop  # what mllm eval and chat stop on


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
