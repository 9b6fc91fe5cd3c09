"""`mllm.hub.push` up to the huggingface_hub call (HfApi replaced: nothing reaches the network), the
token never in any output or file, and `mllm export` / `mllm push --dry-run` through real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_export_llava import make_run_dir

SECRET = "hf_pushSECRETtoken9876543210abc"
REPO = Path(__file__).resolve().parents[1]


class FakeHfApi:
    """Records the calls mllm makes; checks the folder at upload time."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}

    def __init__(self, *args, **kwargs) -> None:
        FakeHfApi.calls.append(("__init__", {"args": args, **kwargs}))

    def create_repo(self, **kwargs):
        FakeHfApi.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs):
        FakeHfApi.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        FakeHfApi.uploaded = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"

        return Commit()


def _files_without_secret(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_push_calls_huggingface_hub_and_never_leaks_the_token(
    tiny_components, tmp_path, monkeypatch, capsys, caplog
):
    import huggingface_hub

    from mllm.hub import push

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.uploaded = [], {}
    run = make_run_dir(
        tiny_components, tmp_path / "run", tune_llm="lora", config={"hub_token": SECRET, "max_steps": 2}
    )
    result = push(run, "someone/tiny-mllm", private=True, revision="dev")
    names = [name for name, _ in FakeHfApi.calls]
    assert names == ["__init__", "create_repo", "create_branch", "upload_folder"]
    init, create, branch, upload = (kw for _, kw in FakeHfApi.calls)
    assert init == {"args": ()}  # mllm hands huggingface_hub no token: it finds HF_TOKEN itself
    assert create == {"repo_id": "someone/tiny-mllm", "private": True, "repo_type": "model", "exist_ok": True}
    assert branch["branch"] == "dev" and branch["repo_id"] == "someone/tiny-mllm"
    assert upload["revision"] == "dev" and upload["repo_id"] == "someone/tiny-mllm"
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json"} <= set(
        FakeHfApi.uploaded
    )
    assert (
        json.loads(FakeHfApi.uploaded["config.json"])["model_type"] == "llava"
    )  # auto: llava fits mlp depth 2
    assert all(SECRET.encode() not in data for data in FakeHfApi.uploaded.values())
    assert result.url.endswith("/commit/abc123") and not result.dry_run
    assert result.folder is None and not Path(upload["folder_path"]).exists()  # the temporary folder is gone
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text
    assert SECRET not in repr(result) and SECRET not in json.dumps(FakeHfApi.calls, default=str)
    _files_without_secret(run)


def test_push_without_a_token_stops_before_building(tiny_components, tmp_path, monkeypatch):
    import huggingface_hub

    from mllm.hub import push

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    run = make_run_dir(tiny_components, tmp_path / "run")
    with pytest.raises(ValueError, match="HF_TOKEN.*hf auth login"):
        push(run, "someone/tiny-mllm", output=tmp_path / "folder")
    assert FakeHfApi.calls == [] and not (tmp_path / "folder").exists()
    with pytest.raises(ValueError, match="USER/NAME"):
        push(run, "no-namespace", dry_run=True)


def _mllm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mllm", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_export_and_push_dry_run(tiny_components, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    run = make_run_dir(tiny_components, tmp_path / "run", llm="qwen2", config={"hub_token": SECRET})
    done = _mllm("export", str(run), "--to", "llava", "--output", str(tmp_path / "llava"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model.safetensors" in done.stdout
    assert isinstance(
        AutoModelForImageTextToText.from_pretrained(tmp_path / "llava"), LlavaForConditionalGeneration
    )

    done = _mllm(
        "push", str(run), "--repo", "someone/tiny-mllm", "--revision", "v1", "--dry-run",
        "--output", str(tmp_path / "dry"), env={"HF_TOKEN": SECRET},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run, nothing uploaded" in done.stdout and str(tmp_path / "dry") in done.stdout
    assert "someone/tiny-mllm (branch v1)" in done.stdout
    for name in ("README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert f"  {name}  " in done.stdout
    assert SECRET not in done.stdout + done.stderr
    _files_without_secret(tmp_path / "dry")
    _files_without_secret(tmp_path / "llava")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "dry")
    processor = AutoProcessor.from_pretrained(tmp_path / "dry")
    assert type(processor).__name__ == "LlavaProcessor"
    assert ModelCard.load(tmp_path / "dry" / "README.md").data.pipeline_tag == "image-text-to-text"
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name  # the dry-run folder is the export


def test_cli_refuses_llava_for_a_qformer_and_names_remote_code(tiny_components, tmp_path):
    run = make_run_dir(tiny_components, tmp_path / "run", connector_type="qformer", num_query_tokens=2)
    done = _mllm("export", str(run), "--to", "llava", "--output", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "remote-code" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) > 0 and not (tmp_path / "out").exists()
    done = _mllm("push", str(run), "--repo", "someone/q", "--dry-run", "--output", str(tmp_path / "q"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(remote-code export)" in done.stdout and (tmp_path / "q" / "modeling_mllm_remote.py").is_file()
