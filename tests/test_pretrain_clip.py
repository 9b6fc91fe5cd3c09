"""The main job's vision pre-training: region-phrase alignment of the patch tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts.pretrain_clip import load_regions, pretrain_clip


def _scene_row(image: str, *shapes: tuple[int, str]) -> dict:
    return {
        "image": image,
        "shapes": [{"cell": cell, "shape": shape, "color": "red", "size": "large"} for cell, shape in shapes],
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_regions_cover_the_patches_of_each_objects_cell(tmp_path):
    scenes = _write_jsonl(
        tmp_path / "scenes.jsonl", [_scene_row("images/a.png", (0, "circle"), (4, "square"))]
    )

    one_patch_per_cell = load_regions(scenes, tmp_path, patch_grid=3)[tmp_path / "images/a.png"]
    assert one_patch_per_cell == [((0,), "a large red circle"), ((4,), "a large red square")]
    # 6x6 patches: the centre cell is rows 2-3, columns 2-3
    four_per_cell = load_regions(scenes, tmp_path, patch_grid=6)[tmp_path / "images/a.png"]
    assert four_per_cell[1] == ((14, 15, 20, 21), "a large red square")


def test_regions_refuse_a_grid_that_does_not_split_into_cells_and_bad_rows(tmp_path):
    scenes = _write_jsonl(tmp_path / "scenes.jsonl", [_scene_row("a.png", (0, "circle")), {"image": "b.png"}])
    with pytest.raises(ValueError, match="multiple of 3"):
        load_regions(scenes, tmp_path, patch_grid=4)
    with pytest.raises(ValueError, match=r"scenes.jsonl, line 2"):
        load_regions(scenes, tmp_path, patch_grid=3)


def test_region_pretraining_lowers_the_region_loss_and_saves_a_tower(tmp_path, tiny_components, synth_small):
    vision = tiny_components["clip-vision"]
    before = load_file(str(vision / "model.safetensors"))
    stats = pretrain_clip(
        vision,
        tiny_components["llama"],
        synth_small / "stage1_train.json",
        synth_small,
        tmp_path / "tower",
        steps=30,
        batch_size=8,
        regions=synth_small / "scenes.jsonl",
    )
    assert stats["final_region_loss"] < stats["first_region_loss"]
    after = load_file(str(tmp_path / "tower" / "model.safetensors"))
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "tower" / "preprocessor_config.json").exists()


def test_region_pretraining_refuses_a_training_image_without_a_scene(tmp_path, tiny_components, synth_small):
    rows = [json.loads(line) for line in (synth_small / "scenes.jsonl").read_text().splitlines()]
    train_images = {r["image"] for r in json.loads((synth_small / "stage1_train.json").read_text())}
    dropped = next(r["image"] for r in rows if r["image"] in train_images)
    scenes = _write_jsonl(tmp_path / "scenes.jsonl", [r for r in rows if r["image"] != dropped])
    with pytest.raises(ValueError, match="has no scene for 1 training image"):
        pretrain_clip(
            tiny_components["clip-vision"],
            tiny_components["llama"],
            synth_small / "stage1_train.json",
            synth_small,
            tmp_path / "tower",
            steps=1,
            regions=scenes,
        )
    assert not (tmp_path / "tower").exists()
