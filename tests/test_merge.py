"""merge(): folded LoRA gives the adapter model's logits; the result is a full-weight dir."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from mllm.models.loading import load_model_and_processor
from mllm.training.merge import merge
from tests.test_checkpoint import probe_inputs
from tests.test_trainer import make_run


@pytest.mark.parametrize("tune_llm", ["lora", "qlora"])
def test_merged_logits_equal_adapter_logits(tiny_components, tmp_path, tune_llm):
    trainer = make_run(
        tiny_components, tmp_path / "run", tune_llm=tune_llm, tune_vision="lora", max_steps=2, save_steps=100
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    # Reference: the adapter on a 32-bit base (QLoRA merges onto the unquantised LLM by design).
    adapter_model, processor = load_model_and_processor(tmp_path / "run", quantize=False)
    assert isinstance(adapter_model, PeftModel)
    out = merge(tmp_path / "run", tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "mllm_run.json").read_text())["format"] == "full"
    merged, _ = load_model_and_processor(out)
    assert not isinstance(merged, PeftModel)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected = adapter_model(**probe_inputs(processor)).logits
        got = merged(**probe_inputs(processor)).logits
        base = adapter_model.get_base_model()
        with adapter_model.disable_adapter():
            without = base(**probe_inputs(processor)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(without, expected, atol=1e-4)  # the adapter matters: the test can fail


def test_mllm_merge_command(tiny_components, tmp_path):
    """`python -m mllm merge RUN --output DIR` as a user runs it; plain transformers loads the result."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    import mllm  # noqa: F401  (registers model_type "mllm" with the Auto classes)

    repo = Path(__file__).resolve().parents[1]
    trainer = make_run(tiny_components, tmp_path / "run", tune_llm="lora", max_steps=2, save_steps=100)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    result = subprocess.run(
        [sys.executable, "-m", "mllm", "merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged" in result.stdout
    assert json.loads((tmp_path / "merged" / "mllm_run.json").read_text())["format"] == "full"
    adapter_model, processor = load_model_and_processor(tmp_path / "run")
    merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        expected = adapter_model(**probe_inputs(processor)).logits
        got = merged.eval()(**probe_inputs(processor)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_mllm_merge_help_and_bad_run(tmp_path):
    from mllm.training.merge import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    with pytest.raises(ValueError, match="not an mllm output directory"):
        main([str(tmp_path), "--output", str(tmp_path / "out")])
