"""lmms-eval's ``--model mllm`` (mllm/integrations/lmms_eval.py) as a user runs it: the real
``python -m lmms_eval`` on a tiny task of the test tree (tests/lmms_eval_tasks/, local files, no
download) scores a tiny run exactly as ``python -m mllm eval`` does on the same questions, answer for
answer; and the simple form's generate_until / loglikelihood agree with mllm's own generation and a
plain forward pass."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.data_fixtures import save_tiny_lora_run

TASKS = Path(__file__).resolve().parent / "lmms_eval_tasks"  # --include_path
TASK = "mllm_tiny_vqa"  # tests/lmms_eval_tasks/mllm_tiny_vqa.yaml
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (240, 240, 20), (10, 10, 10), (250, 250, 250)]
QUESTIONS = ["What colour is it?", "Which colour?"]
MAX_NEW_TOKENS = "4"  # the task's generation_kwargs say the same
BATCH = "4"

if importlib.util.find_spec("lmms_eval") is None:
    message = "lmms-eval is not installed: `bash scripts/setup.sh --dev` installs it (without its heavy deps)"
    if os.environ.get("CI"):
        raise RuntimeError(message)  # CI set up with --dev: a missing lmms-eval is a failure, not a skip
    pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="module")
def run(tiny_components: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lora_run(tiny_components, tmp_path_factory.mktemp("tiny-run"))


def _rows(answers: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """Two questions about each one-colour picture (the answer depends on the image)."""
    pairs = [(i, q) for i in range(len(COLORS)) for q in QUESTIONS]
    return [
        {
            "question_id": f"q{k}",
            "image": f"img{i}.png",
            "question": q,
            "answers": answers[k] if answers else ["-"],
        }
        for k, (i, q) in enumerate(pairs)
    ]


def _write(folder: Path, rows: list[dict[str, Any]]) -> Path:
    data = folder / f"{TASK}.jsonl"  # the name the task's data_files give, in lmms-eval's working directory
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return data


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _start(command: list[str], cwd: Path, tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=cwd, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Exit code and the end of the output of a started command (killed after 300 s)."""
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return process.returncode, output[-4000:]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_lmms_eval_scores_a_local_task_as_mllm_eval_does(run: Path, tmp_path: Path) -> None:
    from mllm.evaluation import evaluate

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for i, color in enumerate(COLORS):
        Image.new("RGB", (24, 24), color).save(data_dir / f"img{i}.png")
    # What the model answers (the same call `mllm eval` makes); then half the references are its
    # answer and half are not, so the expected score is 0.5 and a wrong answer cannot hide.
    probe = evaluate(str(run), "vqa", str(_write(data_dir, _rows())), output=str(tmp_path / "probe"),
                     batch_size=int(BATCH), max_new_tokens=int(MAX_NEW_TOKENS))  # fmt: skip
    said = [r["prediction"] for r in _jsonl(tmp_path / "probe" / "predictions.jsonl")]
    assert probe["num_samples"] == len(said) == 12
    assert len(set(said)) > 6, said  # answers differ with the image: a model ignoring it would be caught
    answers = [[p] if k % 2 == 0 else ["not what it says"] for k, p in enumerate(said)]
    _write(data_dir, _rows(answers))

    # both commands as a user types them, side by side (independent; the wait is the slower one)
    mllm_out, lmms_out = tmp_path / "mllm-eval", tmp_path / "lmms-eval"
    mllm_eval = _start(
        [sys.executable, "-m", "mllm", "eval", str(run), "--task", "vqa", "--data", f"{TASK}.jsonl",
         "--output", str(mllm_out), "--max-new-tokens", MAX_NEW_TOKENS, "--batch-size", BATCH],
        data_dir, tmp_path,
    )  # fmt: skip
    lmms_eval = _start(
        [sys.executable, "-m", "lmms_eval", "--model", "mllm", "--model_args", f"pretrained={run}",
         "--tasks", TASK, "--include_path", str(TASKS), "--batch_size", BATCH,
         "--output_path", str(lmms_out), "--log_samples"],
        data_dir, tmp_path,
    )  # fmt: skip
    (mllm_rc, mllm_log), (lmms_rc, lmms_log) = _finish(mllm_eval), _finish(lmms_eval)

    assert mllm_rc == 0, mllm_log
    mllm_metrics = json.loads((mllm_out / "metrics.json").read_text())
    mllm_rows = _jsonl(mllm_out / "predictions.jsonl")
    assert mllm_metrics["vqa_accuracy"] == mllm_metrics["exact_match"] == pytest.approx(0.5)

    # lmms-eval exits 0 after some errors: its results file tells
    results = sorted(lmms_out.glob("**/*_results.json"))
    assert lmms_rc == 0 and results, lmms_log
    scores = json.loads(results[-1].read_text())["results"][TASK]
    samples = sorted(_jsonl(next(lmms_out.glob(f"**/*_samples_{TASK}.jsonl"))), key=lambda s: s["doc_id"])

    answered, expected = [s["filtered_resps"] for s in samples], [r["prediction"] for r in mllm_rows]
    assert answered == expected, f"lmms-eval answered {answered}, mllm eval {expected}"
    assert scores["vqa_accuracy,none"] == pytest.approx(mllm_metrics["vqa_accuracy"], abs=1e-12)
    assert scores["exact_match,none"] == pytest.approx(mllm_metrics["exact_match"], abs=1e-12)


def _instance(kind: str, args: tuple, doc_id: int) -> Any:
    from lmms_eval.api.instance import Instance

    return Instance(kind, args, 0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_simple_form_generates_and_scores_continuations(run: Path, tmp_path: Path) -> None:
    """``--force_simple``: generate_until answers as `mllm eval` (the task's ``until`` cuts the answer);
    loglikelihood is the model's own loss on the continuation, and greedy only for the argmax token."""
    import torch

    from mllm.evaluation import evaluate
    from mllm.integrations.lmms_eval import MllmChatLmms, MllmLmms, cut_at_stops

    for i, color in enumerate(COLORS[:3]):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"img{i}.png")
    rows = [r for r in _rows() if r["image"] in {"img0.png", "img1.png", "img2.png"}]
    evaluate(str(run), "vqa", str(_write(tmp_path, rows)), output=str(tmp_path / "out"), batch_size=2,
             max_new_tokens=int(MAX_NEW_TOKENS))  # fmt: skip
    expected = [r["prediction"] for r in _jsonl(tmp_path / "out" / "predictions.jsonl")]

    lm = MllmLmms(pretrained=str(run), batch_size=2)
    docs = [{**r, "picture": Image.open(tmp_path / r["image"]).convert("RGB")} for r in rows]
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc: dict[str, Any]) -> list[Image.Image]:
        return [doc["picture"]]

    stop = expected[0][len(expected[0]) // 2 :] or "never"
    kwargs = {
        "max_new_tokens": int(MAX_NEW_TOKENS),
        "until": [stop],
        "temperature": 0,
        "image_aspect_ratio": "x",
    }
    requests = [
        _instance("generate_until", (d["question"], kwargs, visual, k, "t", "test"), k)
        for k, d in enumerate(docs)
    ]
    assert lm.generate_until(requests) == [cut_at_stops(e, [stop]) for e in expected]
    assert cut_at_stops(expected[0], [stop]) != expected[0] or stop == "never"  # the cut happened

    chat = lm.chat
    prompt, images = chat.prompt(docs[0]["question"], [docs[0]["picture"]])
    inputs = chat.processor(text=[prompt], images=[images])
    with torch.inference_mode():  # the greedy next token and the runner-up
        top = chat.model(**inputs).logits[0, -1].topk(2).indices.tolist()
    words = [chat.processor.tokenizer.decode([t]) for t in top]
    two = words[0] + words[1]  # a two-token continuation
    full = chat.processor(text=[prompt + two], images=[images])
    n_prompt = inputs["input_ids"].shape[1]
    assert full["input_ids"][0, n_prompt:].tolist() == top  # the continuation is those two tokens
    labels = full["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.inference_mode():
        loss = float(chat.model(**full, labels=labels).loss)  # mean over the 2 continuation tokens

    requests = [
        _instance("loglikelihood", (docs[0]["question"], c, visual, 0, "t", "test"), 0) for c in (*words, two)
    ]
    (first, greedy_first), (second, greedy_second), (both, _) = lm.loglikelihood(requests)
    assert greedy_first and not greedy_second
    assert first > second
    assert both == pytest.approx(-2 * loss, rel=1e-5)

    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lm.generate_until_multi_round(requests)
    with pytest.raises(ValueError, match="images and text only"):
        MllmChatLmms._messages(lm, [{"role": "user", "content": [{"type": "video", "url": "a.mp4"}]}])
