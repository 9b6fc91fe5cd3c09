"""convert: each converter's output loads with formats and round-trips to its input."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from data_tools import convert
from data_tools.synth import CAPTION_PROMPTS, generate_dataset
from mllm.data.formats import load_records, read_raw_records


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(out, num_scenes=30, seed=1, image_size=32)
    return out


def _run(*argv: str) -> None:
    assert convert.main(list(argv)) == 0


def test_coco_captions_one_record_per_caption(tmp_path, capsys):
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "A dog runs. "},
            {"id": 2, "image_id": 7, "caption": "A brown dog."},
            {"id": 3, "image_id": 8, "caption": "Two cats."},
            {"id": 4, "image_id": 99, "caption": "orphan"},
        ],
    }
    (tmp_path / "caps.json").write_text(json.dumps(coco))
    _run(
        "coco-captions",
        str(tmp_path / "caps.json"),
        "--output",
        str(tmp_path / "out.json"),
        "--image-prefix",
        "train2017",
    )
    printed = capsys.readouterr().out
    assert "wrote 3 records" in printed and "unknown image_id: 1" in printed
    records, _ = load_records(tmp_path / "out.json", image_folder=tmp_path, bad_data="strict")
    # round trip: (image, caption) pairs come back exactly
    back = {(r.images[0], r.turns[1].content) for r in records}
    assert back == {
        (str(tmp_path / "train2017" / "a.jpg"), "A dog runs."),
        (str(tmp_path / "train2017" / "a.jpg"), "A brown dog."),
        (str(tmp_path / "train2017" / "b.jpg"), "Two cats."),
    }
    assert all(r.turns[0].content.removeprefix("<image>\n") in CAPTION_PROMPTS for r in records)


def test_vqa_jsonl_round_trip_keeps_the_most_common_answer(shapes, tmp_path):
    _run("vqa", str(shapes / "vqa_val.jsonl"), "--output", str(tmp_path / "vqa.json"))
    rows = [json.loads(line) for line in (shapes / "vqa_val.jsonl").read_text().splitlines()]
    records, _ = load_records(
        tmp_path / "vqa.json", image_folder=shapes, bad_data="strict", check_images=True
    )
    assert [(r.id, r.turns[0].content, r.turns[1].content, r.images[0]) for r in records] == [
        (row["question_id"], f"<image>\n{row['question']}", row["answers"][0], str(shapes / row["image"]))
        for row in rows
    ]


def test_official_vqa_pair(tmp_path):
    questions = {
        "data_subtype": "val2014",
        "questions": [{"question_id": 5, "image_id": 42, "question": "What sport?"}],
    }
    answers = ["tennis"] * 6 + ["badminton"] * 4
    annotations = {
        "annotations": [{"question_id": 5, "image_id": 42, "answers": [{"answer": a} for a in answers]}]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    out = tmp_path / "out.jsonl"
    _run(
        "vqa",
        str(tmp_path / "q.json"),
        "--annotations",
        str(tmp_path / "a.json"),
        "--output",
        str(out),
        "--prompt-suffix",
        "Answer briefly.",
    )
    (row,) = [raw for raw, _ in read_raw_records(out)]
    assert row == {
        "id": "5",
        "image": "COCO_val2014_000000000042.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat sport?\nAnswer briefly."},
            {"from": "gpt", "value": "tennis"},
        ],
    }


def test_llava_messages_round_trip(shapes, tmp_path):
    src = shapes / "stage2_val.json"
    _run("llava-to-messages", str(src), "--output", str(tmp_path / "m.jsonl"), "--image-folder", str(shapes))
    first = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert first["images"] == [json.loads(src.read_text())[0]["image"]]
    # synth puts the image after the question: the parts keep that order
    assert [part["type"] for part in first["messages"][0]["content"]] == ["text", "image"]
    assert isinstance(first["messages"][1]["content"], str)
    _run(
        "messages-to-llava",
        str(tmp_path / "m.jsonl"),
        "--output",
        str(tmp_path / "back.json"),
        "--image-folder",
        str(shapes),
    )
    assert json.loads((tmp_path / "back.json").read_text()) == json.loads(src.read_text())


def test_messages_relative_paths_default_to_input_folder(tmp_path):
    raw = {
        "id": "x",
        "images": ["imgs/a.png", "imgs/b.png"],
        "messages": [
            {"role": "system", "content": "Be short."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}],
            },
            {"role": "assistant", "content": "same"},
        ],
    }
    bad = {"id": "y", "messages": [{"role": "assistant", "content": "hi"}]}
    (tmp_path / "m.json").write_text(json.dumps([raw, bad]))
    _run("messages-to-llava", str(tmp_path / "m.json"), "--output", str(tmp_path / "l.json"))
    (llava,) = json.loads((tmp_path / "l.json").read_text())
    assert llava["image"] == ["imgs/a.png", "imgs/b.png"]
    assert llava["conversations"][1] == {"from": "human", "value": "Compare\n<image>\n<image>"}
    _run("llava-to-messages", str(tmp_path / "l.json"), "--output", str(tmp_path / "m2.json"))
    assert json.loads((tmp_path / "m2.json").read_text()) == [raw]


def _hf_caption_and_chat(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (6, 5, 3), dtype=np.uint8) for _ in range(3)]
    images = [Image.fromarray(a) for a in arrays]
    images[2] = images[2].convert("RGBA")
    messages = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Q{i}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"A{i}"}]},
        ]
        for i in range(3)
    ]
    data = {"image": images, "messages": messages, "text": ["cap 0", "cap 1", ""]}
    ds = datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())
    return ds, arrays


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_hf_to_llava_round_trip_pixels_and_text(tmp_path, kind):
    ds, arrays = _hf_caption_and_chat(tmp_path)
    src = tmp_path / ("ds" if kind == "save_to_disk" else "ds.parquet")
    ds.save_to_disk(str(src)) if kind == "save_to_disk" else ds.to_parquet(str(src))
    out = tmp_path / "out" / "train.json"
    _run("hf-to-llava", str(src), "--output", str(out))
    rows = json.loads(out.read_text())
    assert [r["image"] for r in rows] == [f"images/{i:08d}_0.png" for i in range(3)]
    records, _ = load_records(out, image_folder=out.parent, bad_data="strict", check_images=True)
    assert [r.turns[1].content for r in records] == ["A0", "A1", "A2"]
    for i in range(2):
        with Image.open(records[i].images[0]) as img:
            np.testing.assert_array_equal(np.asarray(img), arrays[i])


def test_hf_to_llava_caption_column(tmp_path, capsys):
    ds, _ = _hf_caption_and_chat(tmp_path)
    ds.remove_columns("messages").save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "caps.json"
    _run(
        "hf-to-llava",
        str(tmp_path / "ds"),
        "--output",
        str(out),
        "--caption-column",
        "text",
        "--image-dir",
        str(tmp_path / "png"),
    )
    assert "skipped 1 (bad_schema: 1)" in capsys.readouterr().out
    records, _ = load_records(out, bad_data="strict", check_images=True)
    assert [r.turns[1].content for r in records] == ["cap 0", "cap 1"]
    assert records[0].images[0] == str(tmp_path / "png" / "00000000_0.png")


def test_help_works_for_every_subcommand(capsys):
    for cmd in (
        [],
        ["coco-captions"],
        ["vqa"],
        ["messages-to-llava"],
        ["llava-to-messages"],
        ["hf-to-llava"],
    ):
        with pytest.raises(SystemExit) as info:
            convert.main([*cmd, "--help"])
        assert info.value.code == 0
    assert "--output" in capsys.readouterr().out
