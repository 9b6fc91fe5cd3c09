"""`mllm eval --cot [--beams N]`, typed as a user types it, on a tiny model trained to answer in LLaVA-CoT
stages: the <CONCLUSION> is scored against the reference's conclusion, the whole answer and the search
trace are kept, and a resumed search scores what an uninterrupted one does."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.data_fixtures import train_tiny_full_run

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
REPO = Path(__file__).resolve().parents[1]


def _staged(name: str) -> str:
    return (
        f"<SUMMARY>colour</SUMMARY><CAPTION>a {name} picture</CAPTION>"
        f"<REASONING>it is {name}</REASONING><CONCLUSION>{name}</CONCLUSION>"
    )


def _records(folder: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = rng.choice(sorted(COLORS))
        Image.new("RGB", (48, 48), COLORS[name]).save(folder / "images" / f"{seed}-{i}.png")
        records.append(
            {
                "id": f"{seed}-{i}",
                "image": f"images/{seed}-{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": _staged(name)},
                ],
            }
        )
    return records


@pytest.fixture(scope="module")
def cot_run(tiny_components: dict[str, Path], tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cot-eval")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(_records(data, 48, seed=0)))
    (data / "test.json").write_text(json.dumps(_records(data, 6, seed=1)))
    run = train_tiny_full_run(tiny_components, data / "train.json", root / "run", max_steps=80)
    return run, data


def _eval(run: Path, data: Path, out: Path, *flags: str) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mllm", "eval", str(run), "--task", "vqa", "--data", str(data / "test.json"),
         "--output", str(out), "--json", *flags],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_cot_scores_the_conclusion_against_the_references_conclusion(cot_run, tmp_path) -> None:
    run, data = cot_run
    plain = _eval(run, data, tmp_path / "plain")  # without --cot the whole staged text is compared
    metrics = _eval(run, data, tmp_path / "cot", "--cot")
    rows = _rows(tmp_path / "cot")
    truth = {r["id"]: r["conversations"][-1]["value"] for r in json.loads((data / "test.json").read_text())}
    for row in rows:
        assert row["answers"] == [truth[row["question_id"]].split("<CONCLUSION>")[1].split("<")[0]]
        assert "<CONCLUSION>" in row["cot_answer"]
        assert (
            row["prediction"] == row["cot_answer"].split("<CONCLUSION>")[1].split("</CONCLUSION>")[0].strip()
        )
    deserved = sum(r["prediction"] == r["answers"][0] for r in rows) / len(rows)
    assert metrics["exact_match"] == pytest.approx(deserved)
    assert deserved >= 5 / 6, rows  # the tiny model learned the colours
    assert metrics["cot"] == {"beams": 1, "search": "none"} and metrics["no_conclusion"] == 0
    assert plain["exact_match"] < metrics["exact_match"]  # a 16-token cut of the staged text never matches


def test_stage_level_search_keeps_its_trace_and_resumes_to_the_same_metrics(cot_run, tmp_path) -> None:
    run, data = cot_run
    whole = _eval(run, data, tmp_path / "whole", "--cot", "--beams", "2")
    rows = _rows(tmp_path / "whole")
    assert whole["cot"] == {"beams": 2, "search": "stage"}
    for row in rows:
        trace = row["cot_trace"]
        assert [s["name"] for s in trace["stages"]] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
        assert all(len(s["candidates"]) == 2 for s in trace["stages"])
        assert trace["judgements"] == 4 and trace["vision_calls"] == 1
        assert row["cot_answer"] == trace["answer"]
    assert whole["exact_match"] >= 4 / 6, rows

    # interrupted after 3 questions, then run again on the same folder: the same answers and metrics
    part = tmp_path / "part"
    _eval(run, data, part, "--cot", "--beams", "2", "--limit", "3")
    resumed = _eval(run, data, part, "--cot", "--beams", "2")
    assert resumed == whole
    assert [r["cot_answer"] for r in _rows(part)] == [r["cot_answer"] for r in rows]


def test_beams_without_cot_and_unknown_search_are_refused(cot_run, tmp_path, capsys) -> None:
    from mllm.cli import main

    run, data = cot_run
    for flags, message in (
        (["--beams", "2"], "needs --cot"),
        (["--cot", "--beams", "2", "--search", "greedy"], "invalid choice"),
    ):
        try:  # the `mllm` entry point, in this process
            status = main(
                [
                    "eval",
                    str(run),
                    "--task",
                    "vqa",
                    "--data",
                    str(data / "test.json"),
                    "--output",
                    str(tmp_path / "x"),
                    *flags,
                ]
            )
        except SystemExit as stop:  # argparse's refusal
            status = stop.code
        err = capsys.readouterr().err
        assert status != 0 and message in err, err[-1000:]
