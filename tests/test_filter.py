"""filter: each ALIGN/LAION rule removes what it should, counts it, and keeps the rest unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_tools import filter as data_filter


def _rec(rid, caption, image="ok.png"):
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": caption},
        ],
    }


@pytest.mark.parametrize("text", ["image", " Untitled. ", "IMG_1234.jpg", "dsc 0042", "photo-77.PNG", "N/A"])
def test_boilerplate_detected(text):
    assert data_filter.is_boilerplate(text)


@pytest.mark.parametrize("text", ["a photo of a dog", "imagine dragons live", "two images side by side"])
def test_real_captions_are_not_boilerplate(text):
    assert not data_filter.is_boilerplate(text)


def _dataset(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "ok.png")
    Image.new("RGB", (40, 200)).save(tmp_path / "small.png")
    Image.new("RGB", (400, 100)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for i in range(12):
        Image.new("RGB", (70, 70), (i, 0, 0)).save(tmp_path / f"s{i}.png")
    records = [
        _rec("keep1", "a black square on a table"),
        _rec("keep2", "a dark picture of nothing much", image=["ok.png"]),
        _rec("short", "a dog"),
        _rec("long", " ".join(["word"] * 51)),
        _rec("boiler", "IMG_2041.jpeg", image="ok.png"),
        _rec("boiler2", "Click to enlarge!"),
        _rec("small", "a very small image indeed", image="small.png"),
        _rec("wide", "a very wide panorama image", image="wide.png"),
        _rec("broken", "a file that is broken", image="broken.png"),
        _rec("missing", "a file that is not there", image="gone.png"),
        {"id": "bad", "conversations": [{"from": "gpt", "value": "no user turn here"}]},
    ]
    records += [_rec(f"shared{i}", "Stock photo of a thing", image=f"s{i}.png") for i in range(12)]
    records += [_rec(f"shared-ok{i}", "five captions one image", image="s0.png") for i in range(5)]
    (tmp_path / "caps.json").write_text(json.dumps(records))
    return records


def test_rules_and_counts(tmp_path, capsys):
    records = _dataset(tmp_path)
    assert data_filter.main([str(tmp_path / "caps.json"), "--output", str(tmp_path / "kept.json")]) == 0
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert [r["id"] for r in kept] == ["keep1", "keep2"] + [f"shared-ok{i}" for i in range(5)]
    assert kept[1] == records[1]  # kept records are written unchanged
    out = capsys.readouterr().out
    for rule, n in {
        "bad_record": 1,
        "caption_too_short": 1,
        "caption_too_long": 1,
        "boilerplate_caption": 2,
        "shared_caption": 12,
        "unreadable_image": 2,
        "image_too_small": 1,
        "aspect_ratio": 1,
    }.items():
        assert f"{rule} {n}" in out
    assert "kept 7 of 28" in out and "low_similarity" not in out


def test_thresholds_are_options(tmp_path):
    _dataset(tmp_path)
    argv = [
        str(tmp_path / "caps.json"),
        "--output",
        str(tmp_path / "k.jsonl"),
        "--min-words",
        "1",
        "--max-shared",
        "20",
    ]
    argv += ["--min-image-side", "10", "--max-aspect-ratio", "5"]
    assert data_filter.main(argv) == 0
    ids = {json.loads(line)["id"] for line in (tmp_path / "k.jsonl").read_text().splitlines()}
    assert {"short", "small", "wide", "shared3"} <= ids and "boiler" not in ids and "long" not in ids


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("clip")
    words = "a an the red green blue black white square circle dog cat photo of on table".split()
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=16,
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text.update(max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def test_clip_similarity_matches_model_forward(tiny_clip):
    import torch
    from transformers import CLIPModel

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a red square", "the dog on the table", "blue"]
    sims = data_filter.clip_similarities(str(tiny_clip), images, texts, batch_size=2)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")(images=images, return_tensors="pt")
    tokens = AutoTokenizer.from_pretrained(tiny_clip)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=pixels["pixel_values"]).logits_per_image
    expected = (logits.diagonal() / model.logit_scale.exp()).tolist()
    np.testing.assert_allclose(sims, expected, atol=1e-5)


def test_clip_rule_removes_low_similarity(tmp_path, tiny_clip, capsys):
    _dataset(tmp_path)
    data = json.loads((tmp_path / "caps.json").read_text())
    records = [r for r in data if r["id"].startswith("shared-ok") or r["id"].startswith("keep")]
    (tmp_path / "few.json").write_text(json.dumps(records))
    images = [
        Image.open(tmp_path / (r["image"] if isinstance(r["image"], str) else r["image"][0])) for r in records
    ]
    sims = data_filter.clip_similarities(
        str(tiny_clip), images, [r["conversations"][1]["value"] for r in records]
    )
    threshold = sorted(set(sims))[1]  # strictly above the lowest similarity
    argv = [str(tmp_path / "few.json"), "--output", str(tmp_path / "k.json"), "--clip-model", str(tiny_clip)]
    assert data_filter.main([*argv, "--min-similarity", str(threshold)]) == 0
    kept = json.loads((tmp_path / "k.json").read_text())
    n_low = sum(s < threshold for s in sims)
    assert n_low >= 1 and len(kept) == len(records) - n_low
    assert f"low_similarity {n_low}" in capsys.readouterr().out
