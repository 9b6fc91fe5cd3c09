"""data_tools.validate: a clean synthetic set passes; three planted problems are exactly what it reports."""

from __future__ import annotations

import json
import shutil

import pytest

from data_tools.validate import main

pytestmark = pytest.mark.filterwarnings("ignore")


def _args(tiny_components, data, *extra):
    return [
        str(data),
        "--llm",
        str(tiny_components["llama"]),
        "--vision",
        str(tiny_components["clip-vision"]),
        "--no-progress",
        *extra,
    ]


def test_clean_synth_has_no_problems(tiny_components, synth_small, capsys, tmp_path):
    report = tmp_path / "report.json"
    rc = main(_args(tiny_components, synth_small / "stage2_train.json", "--report", str(report)))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.strip().splitlines()[-1].startswith("OK:") and "0 problem(s)" in out
    data = json.loads(report.read_text())
    num_records = len(json.loads((synth_small / "stage2_train.json").read_text()))
    assert data["num_problems"] == 0 and data["num_records"] == num_records
    assert data["lengths"]["min"] > 16  # image tokens are counted


def test_reports_exactly_the_planted_problems(tiny_components, synth_small, tmp_path, capsys):
    shutil.copytree(synth_small / "images", tmp_path / "images")
    records = json.loads((synth_small / "stage2_train.json").read_text())
    images = list(dict.fromkeys(r["image"] for r in records))  # synth writes 2-4 records per image
    (tmp_path / "images" / images[1].split("/")[-1]).unlink()  # deleted image
    corrupt = tmp_path / "images" / images[2].split("/")[-1]
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # corrupted (truncated) file
    mismatch = next(r for r in records if r["image"] == images[3])
    mismatch["conversations"][0]["value"] = "<image><image>\n<image> what is this?"  # 3 placeholders, 1 image
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    report = tmp_path / "report.json"
    rc = main(_args(tiny_components, data, "--image-folder", str(tmp_path), "--report", str(report)))
    out = capsys.readouterr().out
    assert rc == 1
    problems = json.loads(report.read_text())["problems"]
    expected = [(r["id"], "missing_image") for r in records if r["image"] == images[1]]
    expected += [(r["id"], "unreadable_image") for r in records if r["image"] == images[2]]
    expected += [(mismatch["id"], "image_count_mismatch")]
    assert sorted((p["id"], p["reason"]) for p in problems) == sorted(expected)
    assert all(p["source"].startswith("bad.json#") for p in problems)
    assert f"{len(expected)} problem(s)" in out.strip().splitlines()[-1]


def test_model_max_length_drops_are_counted(tiny_components, synth_small, capsys):
    rc = main(_args(tiny_components, synth_small / "stage2_train.json", "--model-max-length", "50"))
    out = capsys.readouterr().out
    assert rc == 1
    dropped = int(out.split("model_max_length=50 drops ")[1].split()[0])
    assert dropped > 0 and f"too_long={dropped}" in out


def test_unreadable_data_file_exits_2(tiny_components, tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert main(_args(tiny_components, bad)) == 2
    assert "error:" in capsys.readouterr().err
