"""mllm.run_dir: the typed run record and its format rules, secrets, corrupt files, leftovers, resume."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from mllm.io import atomic_dir, atomic_write_json, atomic_write_text
from mllm.models.loading import load_model_and_processor
from mllm.run_dir import (
    CorruptRunDirError,
    NotAnOutputDirError,
    RunRecord,
    is_secret_key,
    last_checkpoint,
    mask_secrets,
    read_record,
    resolve_resume,
)
from tests.test_trainer import make_run

TUNING = {"tune_vision": "frozen", "tune_connector": "full", "tune_llm": "lora", "lora_r": 4}

# A record as the code before RunRecord wrote it (same keys): it must still load and round-trip.
OLD_RECORD = {
    "vision_tower": "/c/clip",
    "model_name_or_path": "/c/llama",
    "tuning": TUNING,
    "modified": ["connector"],
    "base_vocab_size": 100,
    "format": "trained",
    "config": {"learning_rate": 0.01, "image_token": "<image>"},
}


def test_old_record_loads_and_round_trips() -> None:
    record = RunRecord.from_json(OLD_RECORD)
    assert record.format == "trained" and record.modified == {"connector"}
    assert record.to_json() == OLD_RECORD


def test_unknown_keys_of_a_newer_record_are_kept() -> None:
    record = RunRecord.from_json({**OLD_RECORD, "written_by": "mllm 9"})
    assert record.to_json()["written_by"] == "mllm 9"


@pytest.mark.parametrize(
    ("tuning", "modified", "fmt", "after_merge", "merged_fmt"),
    [
        ({"tune_vision": "frozen", "tune_llm": "frozen"}, {"connector"}, "trained", {"connector"}, "trained"),
        (
            {"tune_vision": "full", "tune_llm": "frozen"},
            {"connector", "vision_tower"},
            "trained",
            None,
            "trained",
        ),
        (
            {"tune_vision": "frozen", "tune_llm": "full"},
            {"connector", "language_model"},
            "full",
            None,
            "full",
        ),
        (
            {"tune_vision": "frozen", "tune_llm": "lora"},
            {"connector"},
            "trained",
            {"connector", "language_model"},
            "full",
        ),
        (
            {"tune_vision": "lora", "tune_llm": "frozen"},
            {"connector"},
            "trained",
            {"connector", "vision_tower"},
            "trained",
        ),
        (
            {"tune_vision": "frozen", "tune_llm": "qlora"},
            {"connector"},
            "trained",
            {"connector", "language_model"},
            "full",
        ),
    ],
)
def test_format_rules(tuning, modified, fmt, after_merge, merged_fmt) -> None:
    record = RunRecord.new(vision_tower="v", model_name_or_path="l", tuning=tuning, base_vocab_size=10)
    assert record.modified == modified and record.format == fmt
    merged = record.merged("run")
    assert merged.modified == (after_merge or modified) and merged.format == merged_fmt
    assert merged.merged_from == "run"
    # a later stage (init_from, LoRA merged) inherits what the merge changed, and trains a frozen LLM
    later = record.continued(tuning={"tune_vision": "frozen", "tune_llm": "frozen"})
    assert later.modified == merged.modified and later.format == merged_fmt
    assert later.vision_tower == "v" and later.base_vocab_size == 10


def test_record_says_a_stopped_run_was_interrupted() -> None:
    record = RunRecord.from_json(OLD_RECORD).interrupted_at("SIGTERM", 7)
    assert record.to_json()["interrupted"] == {"signal": "SIGTERM", "step": 7}
    assert RunRecord.from_json(record.to_json()).interrupted == {"signal": "SIGTERM", "step": 7}


def test_secrets_are_masked_and_settings_kept() -> None:
    # transformers' rule: TrainingArguments.to_dict masks every key ending in `_token`.
    assert is_secret_key("hub_token") and is_secret_key("push_to_hub_token") and is_secret_key("token")
    assert is_secret_key("wandb_api_key")
    for setting in ("image_token", "num_query_tokens", "model_max_length", "include_num_input_tokens_seen"):
        assert not is_secret_key(setting), setting
    masked = mask_secrets(
        {"hub_token": "SECRET123", "image_token": "<image>", "num_query_tokens": 8, "x_token": None}
    )
    assert masked == {
        "hub_token": "<HUB_TOKEN>",
        "image_token": "<image>",
        "num_query_tokens": 8,
        "x_token": None,
    }
    record = RunRecord.new(
        vision_tower="v",
        model_name_or_path="l",
        tuning=TUNING,
        base_vocab_size=1,
        config={"hub_token": "SECRET123"},
    )
    assert "SECRET123" not in json.dumps(record.to_json())
    # an old record with a token in clear is masked when read (and so when saved again)
    leaked = RunRecord.from_json({**OLD_RECORD, "config": {"hub_token": "SECRET123"}})
    assert "SECRET123" not in json.dumps(leaked.to_json())


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    (tmp_path / "plain.txt").write_text("x")
    with atomic_dir(tmp_path / "d") as staging:
        (staging / "f").write_text("y")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a.txt", tmp_path / "b.json")}
    assert modes == {"a.txt": _default_mode(), "b.json": _default_mode()}
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == _default_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "d", "plain.txt"]


@pytest.fixture(scope="module")
def lora_run(tiny_components, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-run")
    trainer = make_run(tiny_components, out, tune_llm="lora", max_steps=2, save_steps=1)
    trainer.train()
    trainer.save_model(str(out))
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*"))
    return dst


@pytest.mark.parametrize("name", ["trained.safetensors", "adapter_model.safetensors", "mllm_run.json"])
def test_corrupt_file_is_named(lora_run: Path, tmp_path: Path, name: str) -> None:
    broken = _copy(lora_run, tmp_path / "run")
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 3])  # a killed copy
    with pytest.raises(CorruptRunDirError, match=name):
        load_model_and_processor(broken)


def test_missing_weights_file_is_named(lora_run: Path, tmp_path: Path) -> None:
    broken = _copy(lora_run, tmp_path / "run")
    (broken / "trained.safetensors").unlink()
    with pytest.raises(CorruptRunDirError, match="trained.safetensors"):
        load_model_and_processor(broken)


def test_leftovers_of_a_killed_save_are_removed_at_the_next_save(tiny_components, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # what a save killed by SIGKILL leaves: a staged checkpoint, a final-dir staging folder, a temp file
    (out / ".checkpoint-2.partial-staging" / "checkpoint-2").mkdir(parents=True)
    (out / ".save.partial-1234").mkdir()
    (out / ".mllm_run.json.partial-abcd1234").write_text("{")
    (out / "notes.txt").write_text("the user's file stays")
    trainer = make_run(tiny_components, out, tune_llm="frozen", max_steps=1, save_steps=1)
    trainer.train()
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith(".")] == []
    assert "notes.txt" in names and "checkpoint-1" in names


def test_resume_true_means_the_last_checkpoint(lora_run: Path, tmp_path: Path) -> None:
    assert resolve_resume(True, lora_run) == str(lora_run / "checkpoint-2")
    assert resolve_resume("true", lora_run) == str(lora_run / "checkpoint-2")
    assert last_checkpoint(lora_run) == lora_run / "checkpoint-2"
    assert resolve_resume(None, lora_run) is None and resolve_resume(False, lora_run) is None
    assert resolve_resume(str(lora_run / "checkpoint-1"), lora_run) == str(lora_run / "checkpoint-1")
    with pytest.raises(NotAnOutputDirError, match="holds no complete checkpoint"):
        resolve_resume(True, tmp_path)
    with pytest.raises(NotAnOutputDirError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)


def test_interrupted_run_warns_when_loaded(lora_run: Path, tmp_path: Path, caplog) -> None:
    run = _copy(lora_run, tmp_path / "run")
    read_record(run).interrupted_at("SIGTERM", 1).save(run)
    with caplog.at_level("WARNING", logger="mllm.run_dir"):
        model, _ = load_model_and_processor(run)
    assert "stopped early by SIGTERM" in caplog.text
    assert torch.is_tensor(next(model.parameters()))
