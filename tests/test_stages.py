"""stages.train end to end on tiny components: secrets, permissions, eval_data_path, best model,
resume_from_checkpoint=true, and a run stopped by a signal."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import build_run_config
from mllm.run_dir import NotAnOutputDirError, read_record
from mllm.training.stages import train
from mllm.training.trainer import MllmTrainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_tools.synth import generate_dataset

    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, num_scenes=8, seed=0, image_size=32)
    return out


def overrides(tiny_components, data: Path, output_dir: Path, *more: str) -> list[str]:
    return [
        f"vision_tower={tiny_components['clip-vision']}",
        f"model_name_or_path={tiny_components['llama']}",
        f"image_folder={data}",
        f"data_path={data / 'stage1_train.json'}",
        f"output_dir={output_dir}",
        "per_device_train_batch_size=2",
        "use_cpu=true",
        "logging_steps=1",
        "learning_rate=1e-2",
        "disable_tqdm=true",
        *more,
    ]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_secrets_never_reach_a_file_and_permissions_agree(tiny_components, data, tmp_path, caplog):
    out = tmp_path / "run"
    run = build_run_config(
        None, overrides(tiny_components, data, out, "max_steps=2", "save_steps=1", "hub_token=SECRET123")
    )
    assert run.training.hub_token == "SECRET123"
    with caplog.at_level("INFO", logger="mllm"):
        train(run)
    assert "trainable parameters" in caplog.text and "connector" in caplog.text  # the table, at start
    files = _files(out)
    assert {f.relative_to(out).as_posix() for f in files} >= {"mllm_run.json", "checkpoint-1/mllm_run.json"}
    leaked = [f for f in files if b"SECRET123" in f.read_bytes()]
    assert not leaked, leaked
    assert read_record(out).config["hub_token"] == "<HUB_TOKEN>"
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.relative_to(out).as_posix(): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    odd = {name: mode for name, mode in modes.items() if mode != oct(0o666 & ~umask)}
    assert not odd, odd


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "trained.safetensors"))


def test_eval_data_path_gives_eval_loss_and_the_best_checkpoint(tiny_components, data, tmp_path):
    out = tmp_path / "run"
    more = [
        f"eval_data_path={data / 'stage1_train.json'}",
        "eval_strategy=steps",
        "eval_steps=1",
        "save_steps=1",
        "max_steps=3",
        "load_best_model_at_end=true",
        "metric_for_best_model=eval_loss",
        # the *highest* eval loss is "best": the first checkpoint, so best != last and the test can fail
        "greater_is_better=true",
    ]
    result = train(build_run_config(None, overrides(tiny_components, data, out, *more)))
    state = json.loads((out / "trainer_state.json").read_text())
    eval_steps = [e["step"] for e in state["log_history"] if "eval_loss" in e]
    assert eval_steps == [1, 2, 3]
    assert "eval_loss" in result.eval_metrics
    best = Path(state["best_model_checkpoint"])
    assert best == out / "checkpoint-1"
    final, best_w, last_w = _tensors(out), _tensors(best), _tensors(out / "checkpoint-3")
    assert all(torch.equal(final[k], best_w[k]) for k in final)
    assert not all(torch.equal(final[k], last_w[k]) for k in final)


def test_eval_data_path_without_eval_strategy_evaluates_at_the_end(tiny_components, data, tmp_path):
    out = tmp_path / "run"
    more = [f"eval_data_path={data / 'stage1_train.json'}", "max_steps=1", "save_steps=100"]
    result = train(build_run_config(None, overrides(tiny_components, data, out, *more)))
    assert result.eval_metrics["eval_loss"] > 0
    assert (
        json.loads((out / "eval_results.json").read_text())["eval_loss"] == result.eval_metrics["eval_loss"]
    )


def test_resume_from_checkpoint_true_continues_from_the_last_checkpoint(
    tiny_components, data, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    train(build_run_config(None, overrides(tiny_components, data, out, "max_steps=2", "save_steps=1")))
    run = build_run_config(None, overrides(tiny_components, data, out, "max_steps=3", "save_steps=1"))
    run.training = dataclasses.replace(run.training, resume_from_checkpoint=True)
    steps = []
    real_step = MllmTrainer.training_step
    monkeypatch.setattr(
        MllmTrainer, "training_step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k)
    )
    result = train(run)
    assert result.global_step == 3
    assert len(steps) == 1  # only step 3 ran: steps 1-2 came from checkpoint-2


def test_resume_true_without_a_checkpoint_fails_first(tiny_components, data, tmp_path):
    run = build_run_config(None, overrides(tiny_components, data, tmp_path / "empty", "max_steps=1"))
    run.training = dataclasses.replace(run.training, resume_from_checkpoint=True)
    with pytest.raises(NotAnOutputDirError, match="holds no complete checkpoint"):
        train(run)


_STOP_SCRIPT = """
import sys
from pathlib import Path
from mllm.cli import main
from mllm.training.trainer import MllmTrainer

flag = Path(sys.argv[1])
real_step = MllmTrainer.training_step

def training_step(self, *args, **kwargs):
    loss = real_step(self, *args, **kwargs)
    if self.state.global_step >= 1:
        flag.touch()
    return loss

MllmTrainer.training_step = training_step
raise SystemExit(main(["train", *sys.argv[2:]]))  # `mllm train RECIPE key=value ...`, as typed
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_exits_non_zero_and_is_marked_interrupted(
    tiny_components, data, tmp_path, signum, code
):
    out, flag = tmp_path / "run", tmp_path / "started"
    argv = overrides(tiny_components, data, out, "max_steps=100000", "save_steps=100000")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("report_to: none\n", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOP_SCRIPT, str(flag), str(recipe), *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signum)
        assert proc.wait(timeout=180) == code
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoint = next(out.glob("checkpoint-*"))
    assert f"stopped by {signal.Signals(signum).name}" in stderr, stderr[-3000:]
    assert str(checkpoint) in stderr and "resume_from_checkpoint=true" in stderr
    record = read_record(out)
    assert record.interrupted["signal"] == signal.Signals(signum).name
    assert record.interrupted["step"] == int(checkpoint.name.split("-")[1])
