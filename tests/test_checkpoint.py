"""Checkpoints: complete at every save, atomic, and written on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

import mllm.run_dir as checkpoint_module
from mllm.models.loading import load_model_and_processor
from tests.test_trainer import make_run

REPO = Path(__file__).resolve().parents[1]


def probe_inputs(processor):
    return processor(
        text=["<image> a red circle", "<image> a blue"], images=[Image.new("RGB", (32, 32), (250, 0, 0))] * 2
    )


class LogitsAtSave(TrainerCallback):
    """Records the live model's logits on a probe batch at each save.

    The model stays in train mode (no dropout in these runs): bitsandbytes repacks 4-bit weights
    for its CPU kernel on an eval-mode forward, which would change the live model under test.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.logits: dict[int, torch.Tensor] = {}

    def on_save(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.logits[state.global_step] = self.trainer.model(
                **probe_inputs(self.trainer.processing_class)
            ).logits


@pytest.mark.parametrize(
    "modes",
    [
        {"tune_llm": "full"},
        {"tune_llm": "lora", "tune_vision": "full"},
        {"tune_llm": "qlora"},
        {"tune_llm": "frozen"},
    ],
)
def test_intermediate_checkpoint_is_complete(tiny_components, tmp_path, modes):
    trainer = make_run(tiny_components, tmp_path, max_steps=4, save_steps=2, lora_dropout=0.0, **modes)
    probe = LogitsAtSave(trainer)
    trainer.add_callback(probe)
    trainer.train()
    assert set(probe.logits) == {2, 4}
    expected_format = "full" if modes["tune_llm"] == "full" else "trained"
    for step in (2, 4):
        path = tmp_path / f"checkpoint-{step}"
        record = json.loads((path / "mllm_run.json").read_text())
        assert record["format"] == expected_format
        assert (path / "model.safetensors").is_file() == (expected_format == "full")
        assert (path / "adapter_model.safetensors").is_file() == (modes["tune_llm"] in ("lora", "qlora"))
        model, processor = load_model_and_processor(path)
        model.train()  # as the probe ran; without dropout this is deterministic
        with torch.no_grad():
            logits = model(**probe_inputs(processor)).logits
        torch.testing.assert_close(logits, probe.logits[step], rtol=0, atol=1e-5)
    # the two saves differ: the probe sees training progress
    assert not torch.allclose(probe.logits[2], probe.logits[4])


def test_crash_while_saving_keeps_previous_checkpoint(tiny_components, tmp_path, monkeypatch):
    trainer = make_run(tiny_components, tmp_path, tune_llm="lora", max_steps=4, save_steps=2)
    real_save_file = checkpoint_module.save_file
    calls = []

    def save_file_then_crash(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # the second checkpoint: crash halfway through writing it
            raise OSError("disk full (simulated)")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file_then_crash)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2"
    ]  # no partial checkpoint-4, no staging
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)
    model, _ = load_model_and_processor(tmp_path / "checkpoint-2")
    assert type(model).__name__ == "PeftModel"


def test_crash_while_rewriting_output_dir_keeps_old_files(tiny_components, tmp_path, monkeypatch):
    trainer = make_run(tiny_components, tmp_path / "run", tune_llm="lora")
    out = tmp_path / "final"
    trainer.save_model(str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(
        checkpoint_module, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom"))
    )
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError, match="boom"):
        trainer.save_model(str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "run"]


_SIGTERM_SCRIPT = """
import sys
from pathlib import Path
from transformers import TrainerCallback
from tests.test_trainer import make_run

components = {name: Path(sys.argv[1]) / name for name in ("clip-vision", "llama")}
out = Path(sys.argv[2])

class Started(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            (out / "started").touch()

trainer = make_run(components, out, tune_llm="lora", max_steps=100000, save_steps=100000)
trainer.add_callback(Started())
trainer.train()
(out / "exited-cleanly").touch()
"""


def test_sigterm_saves_a_loadable_checkpoint_and_exits(tiny_components, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    root = tiny_components["llama"].parent
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_SCRIPT, str(root), str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "started").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "exited-cleanly").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 2 <= step < 100000
    model, processor = load_model_and_processor(checkpoints[0])
    with torch.no_grad():
        assert torch.isfinite(model(**probe_inputs(processor)).logits).all()
