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


def test_no_model_checks_formats_images_and_placeholders(synth_small, tmp_path, capsys):
    records = json.loads((synth_small / "stage2_train.json").read_text())
    records[0]["conversations"][0]["value"] += " <image>"  # 2 placeholders, 1 image
    records[1]["image"] = "images/missing.png"
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    rc = main([str(data), "--image-folder", str(synth_small), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "image_count_mismatch=1" in out and "missing_image=1" in out
    assert "tokens per sample" not in out and "token lengths not checked" in out


def test_recipe_gives_token_lengths_with_the_recipe_keys(tiny_components, synth_small, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"vision_tower: {tiny_components['clip-vision']}\n"
        f"model_name_or_path: {tiny_components['llama']}\n"
        f"data_path: {synth_small / 'stage2_train.json'}\n"
        f"image_folder: {synth_small}\n"
        "template: auto\nmodel_max_length: 50\n"
    )
    rc = main(["--recipe", str(recipe), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "model_max_length=50 drops" in out and "tokens per sample" in out


def _num_patches(tiny_components) -> int:
    from mllm.models.vision import vision_config_from

    config = vision_config_from(str(tiny_components["clip-vision"]))
    return (config.image_size // config.patch_size) ** 2


def test_image_tokens_follow_vision_feature_select_strategy_full(tiny_components, tmp_path):
    """`validate` counted the default (CLS dropped) before, whatever the model keeps."""
    from data_tools.validate import processor_from_recipe

    components = {
        "vision_tower": str(tiny_components["clip-vision"]),
        "model_name_or_path": str(tiny_components["llama"]),
    }
    default = processor_from_recipe(components)
    full = processor_from_recipe({**components, "vision_feature_select_strategy": "full"})
    assert default.num_image_tokens == _num_patches(tiny_components)
    assert full.num_image_tokens == _num_patches(tiny_components) + 1  # CLS kept


def test_image_tokens_follow_the_qformer_size(tiny_components, synth_small, tmp_path, capsys):
    """A Q-Former with 8 queries gives 8 image tokens (validate used the default 32 before)."""
    base = [
        str(synth_small / "stage1_train.json"),
        "--model-name-or-path",
        str(tiny_components["llama"]),
        "--vision-tower",
        str(tiny_components["clip-vision"]),
        "--connector-type",
        "qformer",
        "--no-progress",
        "--report",
    ]
    lengths = {}
    for n in (8, 12):
        report = tmp_path / f"q{n}.json"
        assert main([*base, str(report), "--num-query-tokens", str(n)]) == 0, capsys.readouterr().out
        lengths[n] = json.loads(report.read_text())["lengths"]["min"]
    assert lengths[12] - lengths[8] == 4  # one image per stage-1 record


def test_model_dir_image_tokens_come_from_its_config(tiny_components, tmp_path):
    """A saved processor that disagrees with its model config: the config's number wins."""
    from transformers import AutoConfig

    from data_tools.validate import load_processor
    from mllm.models.configuration_mllm import MllmConfig
    from mllm.models.processing_mllm import MllmProcessor
    from mllm.models.vision import vision_config_from

    vision, llm = str(tiny_components["clip-vision"]), str(tiny_components["llama"])
    config = MllmConfig(
        vision_config=vision_config_from(vision),
        text_config=AutoConfig.from_pretrained(llm),
        connector_type="qformer",
        num_query_tokens=6,
    )
    run = tmp_path / "run"
    config.save_pretrained(run)
    MllmProcessor.from_components(vision, llm, num_image_tokens=32).save_pretrained(run)
    assert load_processor(str(run)).num_image_tokens == 6
