"""The model card of an export: metadata that `ModelCard.load` parses, each stage's recipe, the eval
table, and a usage snippet that really runs against the exported folder (fresh process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.test_export_llava import make_run_dir, probe_image

SECRET = "hf_cardSECRETtoken0123456789"


def two_stage_run(tiny_components, tmp_path: Path, **kw) -> Path:
    """Stage 1 (connector only) -> stage 2 with init_from, an `mllm eval` result next to stage 2."""
    stage1 = make_run_dir(
        tiny_components,
        tmp_path / "stage1",
        config={"data_path": "someone/tiny-captions", "learning_rate": 1e-3, "max_steps": 10},
        **{k: v for k, v in kw.items() if k != "template"},
    )
    recipe = {
        "data_path": str(tmp_path / "stage2_train.json"),
        "init_from": str(stage1),
        "learning_rate": 2e-5,
        "num_train_epochs": 1,
        "hub_token": SECRET,  # masked by the run record; must never reach the card
        "template": kw.get("template"),
    }
    stage2 = make_run_dir(
        tiny_components,
        tmp_path / "stage2",
        config=recipe,
        **{k: v for k, v in kw.items() if k != "template"},
    )
    (stage2 / "eval" / "vqa").mkdir(parents=True)
    (stage2 / "eval" / "vqa" / "metrics.json").write_text(
        json.dumps({"accuracy": 0.625, "n": 8, "note": "x"})
    )
    return stage2


def python_block(card_text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
    assert len(blocks) == 1, card_text
    return blocks[0]


def run_snippet(snippet: str, folder: Path, image: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The card's code with only the model id and image path pointed at local files."""
    code = re.sub(r"^model_id = .*$", f"model_id = {str(folder)!r}", snippet, count=1, flags=re.M)
    code = re.sub(r"^image_path = .*$", f"image_path = {str(image)!r}", code, count=1, flags=re.M)
    if "import mllm" not in code:
        code += '\nimport sys\nassert "mllm" not in sys.modules\n'
    (cwd / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "snippet.py"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("to", "architecture"),
    [
        ("llava", {"llm": "llama", "connector_type": "mlp"}),
        ("llava", {"llm": "qwen2", "connector_type": "linear", "template": "chatml"}),
        ("remote-code", {"llm": "gpt2", "connector_type": "qformer", "num_query_tokens": 2}),
        ("mllm", {"llm": "qwen2", "vision": "siglip-vision", "tune_llm": "lora"}),
    ],
)
def test_card_metadata_recipes_eval_and_working_usage(tiny_components, tmp_path, to, architecture):
    from mllm.hub import push

    run = two_stage_run(tiny_components, tmp_path, **architecture)
    result = push(
        run,
        "someone/tiny-mllm",
        export_format=to,
        dry_run=True,
        output=tmp_path / "folder",
        license="apache-2.0",
    )
    card = ModelCard.load(result.folder / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["library_name"] == ("mllm" if to == "mllm" else "transformers")
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == [
        "someone/tiny-captions"
    ]  # the Hub data_path; the local json is not a Hub dataset
    assert "base_model" not in data  # the tiny components are local folders, not Hub ids
    assert "Stage 1: `stage1`" in card.text and "Stage 2: `stage2`" in card.text
    assert "learning_rate: `2e-05`" in card.text and "<HUB_TOKEN>" in card.text
    assert "| vqa | accuracy | 0.625 |" in card.text and "| vqa | n | 8 |" in card.text
    snippet = python_block(card.text)
    assert "model_id = 'someone/tiny-mllm'" in snippet
    assert ("trust_remote_code=True" in snippet) == (to == "remote-code")
    if architecture.get("template") == "chatml":
        assert "mllm template `chatml`" in snippet and "<|im_start|>" in snippet
    for file in result.folder.rglob("*"):
        assert not file.is_file() or SECRET not in file.read_text(errors="ignore")
    done = run_snippet(snippet, result.folder, probe_image(tmp_path / "image.png"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the snippet prints the answer"


def test_card_base_model_lists_hub_components(tiny_components, tmp_path):
    """Hub ids in the record become `base_model`; local folders do not."""
    from mllm.hub.card import model_card
    from mllm.models import MllmConfig, MllmProcessor
    from mllm.run_dir import read_record

    run = make_run_dir(tiny_components, tmp_path / "run")
    record = read_record(run)
    record_json = record.to_json() | {"vision_tower": "openai/clip-vit-large-patch14-336"}
    (run / "mllm_run.json").write_text(json.dumps(record_json))
    config = MllmConfig.from_pretrained(str(run))
    processor = MllmProcessor.from_pretrained(str(run))
    card = model_card(run, to="mllm", model_id="me/x", processor=processor, model_config=config)
    data = ModelCard(str(card)).data.to_dict()
    assert data["base_model"] == ["openai/clip-vit-large-patch14-336"]
    assert data["library_name"] == "mllm"
    assert "No `mllm eval` results" in card.text
    assert "import mllm" in python_block(card.text)
