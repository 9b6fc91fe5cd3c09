"""synth: deterministic, split-disjoint, loadable, and every answer readable from the pixels."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_tools import synth
from data_tools.cot import COT_STAGES
from mllm.data.formats import load_records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    start = time.perf_counter()
    counts = synth.generate_dataset(out, num_scenes=2000, seed=0)
    return out, counts, time.perf_counter() - start


def _json(path):
    return json.loads(path.read_text())


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_counts_and_speed(dataset):
    out, counts, seconds = dataset
    assert seconds < 30
    assert counts["images"] == 2000 == len(list((out / "images").glob("*.png")))
    assert [counts[f"stage1_{s}.json"] for s in ("train", "val", "test")] == [1700, 100, 200]
    for name, n in counts.items():
        if name.endswith(".json"):
            assert len(_json(out / name)) == n
        elif name.endswith(".jsonl"):
            assert len(_jsonl(out / name)) == n
    with Image.open(out / "images" / "000000.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_every_file_loads_strictly_with_image_folder(dataset):
    out, counts, _ = dataset
    for kind in ("stage1", "stage2", "cot"):
        records, skipped = load_records(
            out / f"{kind}_val.json", image_folder=out, bad_data="strict", check_images=True
        )
        assert len(records) == counts[f"{kind}_val.json"] and not skipped
    stage2 = _json(out / "stage2_train.json")
    assert {len(r["conversations"]) for r in stage2} == {2}  # one question per record, as VQA asks
    assert all(r["conversations"][0]["value"].endswith("\n<image>") for r in stage2)
    per_scene = Counter(r["image"] for r in stage2)
    assert min(per_scene.values()) == 2 and max(per_scene.values()) == 4


def test_no_scene_shared_between_splits(dataset):
    out, _, _ = dataset
    keys: dict[str, set] = {"train": set(), "val": set(), "test": set()}
    for row in _jsonl(out / "scenes.jsonl"):
        keys[row["split"]].add(tuple((s["shape"], s["color"], s["cell"], s["size"]) for s in row["shapes"]))
    assert sum(map(len, keys.values())) == 2000  # every description is unique
    ids = {split: {r["id"] for r in _json(out / f"stage2_{split}.json")} for split in keys}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    vqa_scenes = {r["image"] for r in _jsonl(out / "vqa_test.jsonl")}
    assert vqa_scenes == {r["image"] for r in _json(out / "stage1_test.json")}


def _colours_in_image(path) -> set[str]:
    with Image.open(path) as img:
        pixels = np.asarray(img).reshape(-1, 3)
    found = set()
    for name, rgb in synth.COLORS.items():
        if (np.abs(pixels.astype(int) - rgb).sum(axis=1) == 0).sum() >= 12:  # at least a small shape's worth
            found.add(name)
    return found


def test_answers_are_readable_from_the_image(dataset):
    out, _, _ = dataset
    for row in _jsonl(out / "vqa_val.jsonl"):
        colours = _colours_in_image(out / row["image"])
        answer = row["answers"][0]
        assert len(set(row["answers"])) == 1 and len(row["answers"]) == 10
        if row["question_type"] == "count":
            assert answer == str(len(colours))
        elif row["question_type"] == "color":
            assert answer in colours
        elif row["question_type"] == "position":  # "Where is the red square?": centroid of red pixels
            rgb = synth.COLORS[row["question"].split()[3]]
            with Image.open(out / row["image"]) as img:
                ys, xs = np.nonzero((np.asarray(img).astype(int) == rgb).all(axis=2))
            cell = int(ys.mean() // (64 / 3)) * 3 + int(xs.mean() // (64 / 3))
            assert answer == synth.POSITIONS[cell]
        elif row["question_type"] == "exist":
            colour = row["question"].split()[3]
            if answer == "yes":
                assert colour in colours
        assert len(answer.split()) <= 2


def test_existence_answers_are_balanced(dataset):
    out, _, _ = dataset
    answers = [
        turn["value"]
        for rec in _json(out / "stage2_train.json")
        for q, turn in zip(rec["conversations"][::2], rec["conversations"][1::2])
        if q["value"].replace("<image>", "").strip().startswith("Is there")
    ]
    assert len(answers) > 200 and 0.4 < answers.count("yes") / len(answers) < 0.6


def test_cot_conclusion_is_the_short_answer(dataset):
    out, _, _ = dataset
    for rec in _json(out / "cot_val.json"):
        text = rec["conversations"][1]["value"]
        assert [text.index(f"<{t}>") for t in COT_STAGES] == sorted(text.index(f"<{t}>") for t in COT_STAGES)
        conclusion = text.split("<CONCLUSION>")[1].removesuffix("</CONCLUSION>")
        assert 0 < len(conclusion.split()) <= 2


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.generate_dataset(a, 40, seed=3, image_size=32)
    synth.main(["--output", str(b), "--num-scenes", "40", "--seed", "3", "--image-size", "32"])
    synth.generate_dataset(c, 40, seed=4, image_size=32)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "stage1_train.json").read_bytes() != (c / "stage1_train.json").read_bytes()


def test_small_dataset_still_has_every_split(tmp_path):
    counts = synth.generate_dataset(tmp_path, 5, seed=0)
    assert (
        counts["stage1_val.json"] == 1
        and counts["stage1_test.json"] == 1
        and counts["stage1_train.json"] == 3
    )
    with pytest.raises(ValueError):
        synth.generate_dataset(tmp_path, 5, seed=0, val_fraction=0.5, test_fraction=0.5)
