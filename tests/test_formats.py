"""formats: every input format normalises to the same Record; every bad record names itself."""

from __future__ import annotations

import json
import os

import datasets
import pytest
from PIL import Image

from mllm.data.errors import BadRecordError
from mllm.data.formats import (
    Record,
    Turn,
    check_record_structure,
    load_records,
    normalize_record,
    read_raw_records,
    record_to_llava,
    save_json,
    save_jsonl,
)

LLAVA = {
    "id": "r1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?"},
        {"from": "gpt", "value": "red"},
    ],
}


def _bad(raw, folder=None, source="d.json#3") -> BadRecordError:
    with pytest.raises(BadRecordError) as info:
        check_record_structure(normalize_record(raw, source, folder))
    return info.value


def test_llava_record_resolves_path_against_image_folder(tmp_path):
    rec = normalize_record(LLAVA, "d.json#0", tmp_path)
    assert rec == Record(
        id="r1",
        turns=(Turn("user", "<image>\nWhat color is it?"), Turn("assistant", "red")),
        images=(str(tmp_path / "a.png"),),
        source="d.json#0",
    )
    check_record_structure(rec)


def test_messages_with_parts_equal_the_llava_record(tmp_path):
    raw = {
        "id": "r1",
        "images": ["a.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
            {"role": "assistant", "content": "red"},
        ],
    }
    assert normalize_record(raw, "d.json#0", tmp_path) == normalize_record(LLAVA, "d.json#0", tmp_path)


def test_image_list_keeps_order_and_inline_message_images(tmp_path):
    raw = dict(LLAVA, image=["x/1.png", "2.png"])
    raw["conversations"] = [
        {"from": "human", "value": "<image> vs <image>"},
        {"from": "gpt", "value": "same"},
    ]
    rec = normalize_record(raw, "s", tmp_path)
    assert rec.images == (str(tmp_path / "x" / "1.png"), str(tmp_path / "2.png"))
    inline = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "q.png"}, {"type": "text", "text": "hi"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
        ]
    }
    assert normalize_record(inline, "s", tmp_path).images == (str(tmp_path / "q.png"),)


def test_single_image_without_placeholder_gets_one_prepended(tmp_path):
    raw = dict(
        LLAVA,
        conversations=[
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Yo"},
        ],
    )
    rec = normalize_record(raw, "s", tmp_path)
    assert rec.turns[1] == Turn("user", "<image>\nHi") and rec.turns[0].content == "be brief"
    check_record_structure(rec)


def test_missing_id_uses_source():
    raw = {k: v for k, v in LLAVA.items() if k != "id"}
    assert normalize_record(raw, "d.json#9").id == "d.json#9"


def test_text_only_record_has_no_images():
    raw = {"id": 5, "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    rec = normalize_record(raw, "s")
    assert rec.id == "5" and rec.images == ()
    check_record_structure(rec)


@pytest.mark.parametrize("path", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_path_escaping_image_folder(tmp_path, path):
    err = _bad(dict(LLAVA, image=path), tmp_path / "imgs")
    assert err.reason == "path_escapes_root" and "r1" in str(err) and "d.json#3" in str(err)


def test_symlink_leading_out_of_the_image_folder_is_refused_unless_allowed(tmp_path):
    """A link inside image_folder to a file outside it is a way out too (training and eval)."""
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "inside.png").symlink_to(outside)
    (folder / "real.png").write_bytes(outside.read_bytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "to-real.png").symlink_to(folder / "real.png")
    err = _bad(dict(LLAVA, image="inside.png"), folder)
    assert err.reason == "path_escapes_root" and "symlink" in str(err) and "allow_symlinks" in str(err)
    allowed = normalize_record(dict(LLAVA, image="inside.png"), "d.json#3", folder, allow_symlinks=True)
    assert allowed.images == (str(folder / "inside.png"),)
    inside = normalize_record(dict(LLAVA, image="sub/to-real.png"), "d.json#3", folder)  # stays inside
    assert inside.images == (str(folder / "sub" / "to-real.png"),)


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"id": "r1", "image": "a.png"}, "conversations"),
        (dict(LLAVA, conversations="hi"), "conversations"),
        (dict(LLAVA, conversations=[{"from": "bot", "value": "x"}]), "conversations[0].from"),
        (dict(LLAVA, conversations=[{"from": "human", "value": 3}]), "conversations[0].value"),
        (dict(LLAVA, image=7), "image[0]"),
        ({"id": "r1", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"id": "r1", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_schema_names_the_key(raw, key):
    err = _bad(raw)
    assert err.reason == "bad_schema" and key in err.detail and "r1" in str(err) and "d.json#3" in str(err)


def test_non_object_record_is_bad_schema():
    assert _bad(["not", "a", "dict"]).reason == "bad_schema"


@pytest.mark.parametrize(
    "conversations,reason",
    [
        ([], "empty_conversation"),
        ([{"from": "system", "value": "s"}], "empty_conversation"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>q"}], "bad_turn_order"),
        (
            [
                {"from": "human", "value": "<image>q"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ],
            "bad_turn_order",
        ),
        (
            [
                {"from": "human", "value": "<image>q"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "q"},
            ],
            "bad_turn_order",
        ),
        (
            [
                {"from": "human", "value": "<image>q"},
                {"from": "system", "value": "s"},
                {"from": "gpt", "value": "a"},
            ],
            "bad_turn_order",
        ),
        (
            [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
            "image_count_mismatch",
        ),
    ],
)
def test_structural_errors(conversations, reason):
    err = _bad(dict(LLAVA, conversations=conversations))
    assert err.reason == reason and "'r1'" in str(err) and "d.json#3" in str(err)


def test_several_images_without_placeholders_is_a_mismatch():
    raw = dict(
        LLAVA,
        image=["a.png", "b.png"],
        conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    )
    assert _bad(raw).reason == "image_count_mismatch"


def test_placeholder_without_image_is_a_mismatch():
    raw = {"id": "r1", "conversations": LLAVA["conversations"]}
    assert _bad(raw).reason == "image_count_mismatch"


def _write_sample_files(tmp_path):
    records = [LLAVA, dict(LLAVA, id="r2", image="../escape.png"), {"id": "r3", "conversations": []}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return records


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_load_records_skip_counts_by_reason(tmp_path, name):
    _write_sample_files(tmp_path)
    records, skipped = load_records(tmp_path / name, image_folder=tmp_path)
    assert [r.id for r in records] == ["r1"]
    assert records[0].images == (str(tmp_path / "a.png"),)
    assert skipped == {"path_escapes_root": 1, "empty_conversation": 1}


def test_load_records_strict_raises_first_with_line_source(tmp_path):
    _write_sample_files(tmp_path)
    with pytest.raises(BadRecordError) as info:
        load_records(tmp_path / "d.jsonl", image_folder=tmp_path, bad_data="strict")
    assert (
        info.value.reason == "path_escapes_root"
        and info.value.source == "d.jsonl#2"
        and "'r2'" in str(info.value)
    )


def test_load_records_defaults_to_data_folder_and_can_check_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.json").write_text(json.dumps([LLAVA]))
    records, _ = load_records(tmp_path / "sub" / "d.json")
    assert records[0].images == (str(tmp_path / "sub" / "a.png"),)
    records, skipped = load_records(tmp_path / "sub" / "d.json", check_images=True)
    assert records == [] and skipped == {"missing_image": 1}
    with pytest.raises(ValueError, match="bad_data"):
        load_records(tmp_path / "sub" / "d.json", bad_data="ignore")


@pytest.mark.parametrize(
    "name,text,where",
    [
        ("bad.json", '[{"id": 1}, ', "bad.json"),
        ("bad.jsonl", '{"id": 1}\n{oops\n', "bad.jsonl:2"),
        ("obj.json", '{"id": 1}', "obj.json"),
        ("bad.parquet", "not parquet", "bad.parquet"),
        ("data.csv", "a,b", "data.csv"),
    ],
)
def test_malformed_file_error_names_file(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=where):
        read_raw_records(tmp_path / name)


def _hf_dataset() -> datasets.Dataset:
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    messages = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        [
            {"role": "user", "content": [{"type": "text", "text": "Color?"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
        ],
    ]
    return datasets.Dataset.from_dict(
        {"id": ["a", "b"], "image": [red, blue], "messages": messages}
    ).cast_column("image", datasets.Image())


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_hf_dataset_with_image_column(tmp_path, kind):
    ds = _hf_dataset()
    if kind == "save_to_disk":
        path = tmp_path / "ds"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / "ds.parquet"
        ds.to_parquet(str(path))
    records, skipped = load_records(path)
    assert not skipped
    assert [r.turns[0].content for r in records] == ["<image>\nColor?", "Color?\n<image>"]
    assert records[1].turns[1] == Turn("assistant", "blue") and records[1].source == f"{path.name}#1"
    assert isinstance(records[0].images[0], Image.Image)
    assert records[0].images[0].convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_hf_undecoded_image_bytes_become_pil():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (0, 255, 0)).save(buf, "PNG")
    rec = normalize_record(dict(LLAVA, image={"bytes": buf.getvalue(), "path": None}), "s")
    assert rec.images[0].convert("RGB").getpixel((0, 0)) == (0, 255, 0)


def test_dataset_dict_folder_needs_one_split(tmp_path):
    datasets.DatasetDict({"train": _hf_dataset(), "test": _hf_dataset()}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="splits"):
        read_raw_records(tmp_path / "dd")
    assert len(read_raw_records(tmp_path / "dd" / "train")) == 2


def test_imagefolder_metadata(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "0.png")
    row = {"file_name": "0.png", "conversations": LLAVA["conversations"]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    records, skipped = load_records(tmp_path, check_images=True)
    assert not skipped and records[0].images == (str(tmp_path / "0.png"),)


def test_record_to_llava_round_trip(tmp_path):
    raw = dict(
        LLAVA,
        image=["a.png", "sub/b.png"],
        conversations=[
            {"from": "system", "value": "s"},
            {"from": "human", "value": "<image><image>"},
            {"from": "gpt", "value": "x"},
        ],
    )
    rec = normalize_record(raw, "d.json#0", tmp_path)
    assert record_to_llava(rec, tmp_path) == raw
    assert normalize_record(record_to_llava(rec), "d.json#0") == rec  # absolute paths without a folder
    with pytest.raises(ValueError, match="in-memory"):
        record_to_llava(Record("m", (), (Image.new("RGB", (1, 1)),), "s"))


def test_save_json_and_jsonl_are_atomic_and_readable(tmp_path):
    save_json([LLAVA], tmp_path / "o" / "x.json")
    save_jsonl([LLAVA, LLAVA], tmp_path / "x.jsonl")
    assert json.loads((tmp_path / "o" / "x.json").read_text()) == [LLAVA]
    assert [r for r, _ in read_raw_records(tmp_path / "x.jsonl")] == [LLAVA, LLAVA]
    assert sorted(os.listdir(tmp_path / "o")) == ["x.json"]  # no temporary file left behind
    with pytest.raises(TypeError):
        save_json({"x": object()}, tmp_path / "o" / "x.json")
    assert json.loads((tmp_path / "o" / "x.json").read_text()) == [LLAVA]  # old file intact
    assert sorted(os.listdir(tmp_path / "o")) == ["x.json"]
