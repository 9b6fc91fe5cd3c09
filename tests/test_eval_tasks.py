"""`mllm eval --task caption|mcq|yesno|vqa` as a user types it, on a tiny saved model, and resumption:
an interrupted or limited run picks up where it stopped and ends with the files of an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import mllm.inference.generate as generate
from mllm.evaluation import evaluate
from tests.data_fixtures import save_tiny_lora_run


@pytest.fixture(scope="module")
def saved_model(tiny_components: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA run saved as `mllm train` saves it."""
    return save_tiny_lora_run(tiny_components, tmp_path_factory.mktemp("tiny-run"))


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-colour pictures with a caption file (COCO style), mcq, yes/no and vqa files about them."""
    folder = tmp_path_factory.mktemp("eval-data")
    names = sorted(COLORS)
    for name in names:
        Image.new("RGB", (24, 24), COLORS[name]).save(folder / f"{name}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{n}.png"} for i, n in enumerate(names)],
        "annotations": [
            {"image_id": i, "caption": c} for i, n in enumerate(names) for c in (f"a {n} square", f"all {n}")
        ],
    }
    (folder / "captions.json").write_text(json.dumps(coco))
    mcq = [
        {
            "id": f"m{i}",
            "image": f"{n}.png",
            "question": "What colour is the picture?",
            "options": names,
            "answer": n,
        }
        for i, n in enumerate(names)
    ]
    yesno = [
        {
            "question_id": f"y{i}{a}",
            "image": f"{n}.png",
            "text": f"Is the picture {a}?",
            "label": "yes" if a == n else "no",
        }
        for i, n in enumerate(names)
        for a in names
    ]
    vqa = [
        {"id": f"v{k}", "image": f"{n}.png", "question": f"Colour {k}?", "answer": n}
        for k, n in enumerate(names * 3)
    ]
    for name, rows in (("mcq", mcq), ("yesno", yesno), ("vqa", vqa)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _eval(run: Path, task: str, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mllm", "eval", str(run), "--task", task, "--data", str(data),
               "--output", str(out), "--max-new-tokens", "3", "--batch-size", "2", *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("task", "file", "extra", "keys"),
    [
        (
            "caption",
            "captions.json",
            ["--metrics", "bleu,rouge,cider"],
            {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"},
        ),
        ("mcq", "mcq.jsonl", ["--circular"], {"accuracy", "circular_accuracy", "num_unmatched"}),
        ("yesno", "yesno.jsonl", [], {"accuracy", "precision", "recall", "f1", "yes_ratio", "num_neither"}),
    ],
)
def test_each_task_through_the_command(
    saved_model: Path, data: Path, tmp_path: Path, task: str, file: str, extra: list[str], keys: set[str]
) -> None:
    pytest.importorskip("pycocoevalcap") if task == "caption" else None
    done = _eval(saved_model, task, data / file, tmp_path, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert keys <= set(metrics), metrics
    assert f"{task} results" in done.stdout and "| num_samples" in done.stdout  # the table at the end
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["num_samples"] == {"caption": 3, "mcq": 9, "yesno": 9}[task]
    assert all({"id", "prompt", "prediction", "references", "score"} <= set(r) for r in rows)
    assert not (tmp_path / "predictions.partial.jsonl").exists()
    if task == "mcq":  # circular: 3 questions, each in 3 rotations
        assert metrics["num_questions"] == 3
        assert metrics["accuracy"] == pytest.approx(sum(r["score"] for r in rows if "shift" not in r) / 3)
    if task == "yesno":
        assert metrics["yes_ratio"] == pytest.approx(sum(r["parsed"] == "yes" for r in rows) / 9)
    if task == "caption":
        assert rows[0]["references"] == ["a blue square", "all blue"]
        assert all(r["score"] == r["scores"]["CIDEr"] for r in rows)


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_files_of_an_uninterrupted_one(
    saved_model: Path,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    real = generate.generate_answers
    asked: list[str] = []
    calls = {"n": 0, "stop_at": None}

    def counting(model, processor, prompts, images, **kw):
        calls["n"] += 1
        if calls["stop_at"] is not None and calls["n"] >= calls["stop_at"]:
            raise _Stop  # the run dies in its third batch, as Ctrl-C or a lost node would stop it
        asked.extend(prompts)
        return real(model, processor, prompts, images, **kw)

    monkeypatch.setattr(generate, "generate_answers", counting)
    kw = dict(batch_size=2, max_new_tokens=3)
    full = evaluate(str(saved_model), "vqa", str(data / "vqa.jsonl"), output=str(tmp_path / "full"), **kw)
    assert len(asked) == 9
    capsys.readouterr()

    asked.clear()
    calls.update(n=0, stop_at=3)
    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        evaluate(str(saved_model), "vqa", str(data / "vqa.jsonl"), output=str(out), **kw)
    assert len((out / "predictions.partial.jsonl").read_text().splitlines()) == 4  # two batches kept
    assert not (out / "metrics.json").exists()
    calls.update(stop_at=None)
    asked.clear()
    again = evaluate(str(saved_model), "vqa", str(data / "vqa.jsonl"), output=str(out), **kw)
    assert "4 of 9 samples already predicted, predicting the other 5" in capsys.readouterr().err
    assert len(asked) == 5
    assert again == full
    assert (out / "metrics.json").read_text() == (tmp_path / "full" / "metrics.json").read_text()
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "full" / "predictions.jsonl").read_text()

    # --limit, then the whole file: only the rest is asked
    asked.clear()
    out = tmp_path / "limited"
    evaluate(str(saved_model), "vqa", str(data / "vqa.jsonl"), output=str(out), limit=4, **kw)
    evaluate(str(saved_model), "vqa", str(data / "vqa.jsonl"), output=str(out), **kw)
    assert (
        len(asked) == 9
        and (out / "metrics.json").read_text() == (tmp_path / "full" / "metrics.json").read_text()
    )

    # other settings start the folder again, saying why (their answers would differ); so does --overwrite
    capsys.readouterr()
    asked.clear()
    evaluate(
        str(saved_model), "vqa", str(data / "vqa.jsonl"), output=str(out), batch_size=2, max_new_tokens=5
    )
    assert "other settings (max_new_tokens: 3 there, 5 now); starting again" in capsys.readouterr().err
    assert len(asked) == 9
    asked.clear()
    evaluate(str(saved_model), "vqa", str(data / "vqa.jsonl"), output=str(out), limit=2, overwrite=True, **kw)
    assert len(asked) == 2


def test_a_changed_prompt_is_asked_again(
    saved_model: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    monkeypatch.setattr(
        generate,
        "generate_answers",
        lambda m, p, prompts, i, **kw: asked.extend(prompts) or ["x"] * len(prompts),
    )
    kw = dict(output=str(tmp_path), limit=3)
    evaluate(str(saved_model), "yesno", str(data / "yesno.jsonl"), **kw)
    evaluate(str(saved_model), "yesno", str(data / "yesno.jsonl"), instruction="Answer yes or no.", **kw)
    assert len(asked) == 6 and asked[-1].count("Answer yes or no.") == 1
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all("Answer yes or no." in r["prompt"] for r in rows)
