"""`mllm chat` driven in a pseudo-terminal, as a user types: the real installed command, not its functions."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.data_fixtures import save_tiny_lora_run

pexpect = pytest.importorskip("pexpect")

PROMPT = "you> "
TIMEOUT = 120  # seconds for start-up (torch import, model load) on a loaded 2-core machine


def _run(components: dict[str, Path], out: Path, max_length: int) -> Path:
    """A tiny LoRA run as `mllm train` saves it, with `template: chatml` and `model_max_length`."""
    return save_tiny_lora_run(
        components, out, "qwen2", {"template": "chatml", "model_max_length": max_length}
    )


@pytest.fixture(scope="module")
def chat_run(tiny_components: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tiny_components, tmp_path_factory.mktemp("chat-run"), 256)


def _mllm() -> str:
    found = shutil.which("mllm", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the `mllm` console script is not installed beside this python")
    return found


def _spawn(*args: str, cwd: Path) -> pexpect.spawn:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb", "CUDA_VISIBLE_DEVICES": ""}
    child = pexpect.spawn(_mllm(), ["chat", *args], cwd=str(cwd), env=env, encoding="utf-8", timeout=TIMEOUT)
    child.expect_exact(PROMPT)
    child.timeout = 60
    return child


def _answer(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact("model> ")
    child.expect_exact(PROMPT)
    return child.before


def test_chat_session_in_a_terminal(chat_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 32), (220, 20, 20)).save(image)
    child = _spawn(str(chat_run), "--max-new-tokens", "6", cwd=tmp_path)
    assert "/help" in child.before  # the banner points at the commands

    first = _answer(child, "hello, who are you?")
    assert first.strip(), "the model printed no answer"

    child.sendline("/image missing.png")
    child.expect_exact(PROMPT)
    assert "cannot use image missing.png" in child.before and "does not exist" in child.before

    child.sendline("/frobnicate")
    child.expect_exact(PROMPT)
    assert "unknown command /frobnicate" in child.before

    child.sendline(f"/image {image}")
    child.expect_exact(PROMPT)
    assert "image: " in child.before and "40x32" in child.before

    second = _answer(child, "what color is it?")
    assert second.strip()

    child.sendline("/help")
    child.expect_exact(PROMPT)
    assert "/save FILE" in child.before

    child.sendline("/save talk.json")
    child.expect_exact(PROMPT)
    assert "saved 4 turns" in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    [record] = json.loads((tmp_path / "talk.json").read_text(encoding="utf-8"))
    assert record["image"] == str(image)
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"] == "hello, who are you?"
    assert turns[2]["value"] == "<image>\nwhat color is it?"  # the image goes with the question after /image
    assert turns[3]["value"] and turns[3]["value"] in second  # what was streamed is what was kept

    # the saved record is training data: it normalises and passes the structure check
    from mllm.data.formats import check_record_structure, normalize_record

    check_record_structure(normalize_record(record, "talk.json#0", tmp_path, check_root=False))


def test_history_is_trimmed_to_the_context_never_the_image(
    tiny_components: dict[str, Path], tmp_path: Path
) -> None:
    """A context for about two exchanges: the third question drops the oldest one, with a notice,
    and the image given at start stays in the conversation; Ctrl-D leaves."""
    run = _run(tiny_components, tmp_path / "small-context", 90)
    image = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (20, 20, 220)).save(image)
    child = _spawn(str(run), "--image", str(image), "--max-new-tokens", "4", cwd=tmp_path)
    notices = 0
    for question in ["what is in the picture here?", "and what color is the thing?", "how many are there?"]:
        out = _answer(child, question)
        notices += out.count("dropped the oldest exchange")
    assert notices >= 1
    child.sendline("/save kept.json")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    [record] = json.loads((tmp_path / "kept.json").read_text(encoding="utf-8"))
    values = [t["value"] for t in record["conversations"]]
    assert len(values) < 6  # an exchange was dropped
    assert values[-2].endswith("how many are there?")
    assert sum(v.count("<image>") for v in values) == 1 and values[0].startswith("<image>\n")
    assert record["image"] == str(image)


def test_cot_chat_shows_each_stage_and_the_beams(chat_run: Path, tmp_path: Path) -> None:
    child = _spawn(str(chat_run), "--cot", "--beams", "2", "--max-new-tokens", "4", cwd=tmp_path)
    out = _answer(child, "what is this?")
    for stage in ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION"):
        assert f"[{stage}] 2 candidates, #" in out
    assert out.index("[SUMMARY]") < out.index("[CONCLUSION]")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
