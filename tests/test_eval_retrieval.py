"""`mllm eval --task retrieval`, driven as a user types it: a BLIP-2 stage-1 run dir (ITC, ITM re-ranking)
and a CLIP dual encoder score exactly what their own similarity gives; bad inputs get clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.evaluation.retrieval import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]


def _mllm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mllm", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def _mllm_here(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`mllm ARGS` through the same entry point in this process (exit status, stdout, stderr)."""
    from mllm.cli import main

    try:
        status = main(list(args))
        message = ""
    except SystemExit as stop:  # argparse errors and refusals end the process this way
        status, message = (stop.code, "") if isinstance(stop.code, int) else (1, str(stop.code))
    out, err = capsys.readouterr()
    return status, out, err + message


def _caption_rows(data: Path, n: int) -> Path:
    """``n`` images of the synthetic set, each with its caption and a second, distinct one."""
    records = json.loads((data / "stage1_train.json").read_text(encoding="utf-8"))[:n]
    rows = [
        {"id": r["id"], "image": r["image"], "captions": [r["conversations"][-1]["value"], f"picture {i}"]}
        for i, r in enumerate(records)
    ]
    path = data / "retrieval_rows.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stage1_run(tiny_components, synth_small, tmp_path_factory) -> Path:
    from mllm.config import build_run_config
    from mllm.training.stages import train

    out = tmp_path_factory.mktemp("retrieval") / "stage1"
    run = build_run_config(
        REPO / "recipes" / "blip2" / "stage1_qformer.yaml",
        [
            f"vision_tower={tiny_components['clip-vision']}",
            f"model_name_or_path={tiny_components['llama']}",
            f"data_path={synth_small / 'stage1_train.json'}",
            f"image_folder={synth_small}",
            f"output_dir={out}",
            "num_query_tokens=4",
            "qformer_hidden_size=32",
            "qformer_embed_dim=16",
            "qformer_max_text_length=24",
            "per_device_train_batch_size=8",
            "max_steps=3",
            "save_strategy=no",
            "disable_tqdm=true",
        ],
    )
    train(run)
    return out


def _direct_qformer(run: Path, data: Path, rows: list[dict]) -> tuple[torch.Tensor, list[int], object]:
    """The similarity matrix computed straight from the stage-1 model's own methods."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from mllm.training.qformer_stage import PairCollator, load_stage1

    model = load_stage1(run).eval()
    tok = AutoTokenizer.from_pretrained(run)
    pixels = AutoImageProcessor.from_pretrained(run)(
        images=[Image.open(data / r["image"]).convert("RGB") for r in rows], return_tensors="pt"
    )["pixel_values"]
    cfg = model.config
    captions = [c for r in rows for c in r["captions"]]
    owners = [i for i, r in enumerate(rows) for _ in r["captions"]]
    text = PairCollator(cfg.qformer_config.pad_token_id, cfg.max_text_length)(
        [
            {
                "pixel_values": torch.zeros(1),
                "input_ids": [cfg.cls_token_id, *tok(c, add_special_tokens=False)["input_ids"]][
                    : cfg.max_text_length
                ],
            }
            for c in captions
        ]
    )
    with torch.no_grad():
        features = model.vision_features(pixels)
        sim = model.similarity(features, text["input_ids"], text["attention_mask"])

    def itm(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.itm_scores(features[i], text["input_ids"][t], text["attention_mask"][t])

    return sim, owners, itm


def test_stage1_run_scores_its_own_itc_and_itm_similarity(
    stage1_run: Path, synth_small: Path, tmp_path
) -> None:
    data = _caption_rows(synth_small, 12)
    out = tmp_path / "eval"
    done = _mllm(
        "eval", str(stage1_run), "--task", "retrieval", "--data", str(data), "--output", str(out),
        "--rerank", "5", "--batch-size", "64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "retrieval results" in done.stdout and "t2i_r@5" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    rows = json.loads(data.read_text())
    sim, owners, itm = _direct_qformer(stage1_run, synth_small, rows)
    expected = retrieval_metrics(sim, owners)
    reranked = retrieval_metrics(sim, owners, itm_score=itm, rerank_k=5)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    for key, value in reranked.items():
        assert metrics[f"itm_{key}"] == pytest.approx(value, abs=1e-6), key
    assert metrics["num_images"] == 12 and metrics["num_captions"] == 24
    assert metrics["chance_t2i_r@5"] == pytest.approx(100 * 5 / 12)
    assert metrics["scorer"] == "blip2-qformer"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 24
    # each caption's rank of its true image agrees with the similarity matrix, ties counted against
    # the truth as Recall@K counts them
    for j, row in enumerate(predictions):
        true = sim[owners[j], j]
        assert row["t2i_rank"] == int((sim[:, j] >= true).sum()) - 1
        assert row["image_id"] == rows[owners[j]]["id"]


def test_batched_encoding_gives_the_same_similarities(stage1_run: Path, synth_small: Path) -> None:
    """Batches only split the work (the CLI tests encode in one batch: a random model's near-ties would
    let float noise between batch shapes reorder ranks)."""
    from PIL import Image

    from mllm.evaluation.retrieval_eval import Encoded, QFormerScorer

    rows = json.loads(_caption_rows(synth_small, 9).read_text())
    scorer = QFormerScorer(stage1_run)
    images = [Image.open(synth_small / r["image"]).convert("RGB") for r in rows]
    captions = [c for r in rows for c in r["captions"]]
    whole = Encoded(scorer.encode_images(images), scorer.encode_texts(captions))
    split = Encoded(
        torch.cat([scorer.encode_images(images[i : i + 4]) for i in range(0, 9, 4)]),
        {
            k: torch.cat([scorer.encode_texts(captions[i : i + 4])[k] for i in range(0, 18, 4)])
            for k in ("input_ids", "attention_mask")
        },
    )
    torch.testing.assert_close(
        scorer.similarity(split, 4), scorer.similarity(whole, 64), atol=1e-5, rtol=1e-5
    )
    itm_whole = scorer.itm(whole, 64)(torch.arange(9).repeat(2), torch.arange(18))
    itm_split = scorer.itm(split, 4)(torch.arange(9).repeat(2), torch.arange(18))
    torch.testing.assert_close(itm_split, itm_whole, atol=1e-5, rtol=1e-5)


def test_a_missing_image_is_skipped_and_counted_or_stops_with_strict(
    stage1_run: Path, synth_small: Path, tmp_path, capsys
) -> None:
    rows = json.loads(_caption_rows(synth_small, 6).read_text())
    rows[2]["image"] = "images/not-there.png"
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    status, out, err = _mllm_here(
        capsys, "eval", str(stage1_run), "--task", "retrieval", "--data", str(data), "--output", str(tmp_path / "e"),
        "--image-folder", str(synth_small), "--json",
    )  # fmt: skip
    assert status == 0, err
    metrics = json.loads(out)
    assert metrics["num_images"] == 5 and metrics["num_skipped"] == 1
    assert metrics["skipped"] == {"missing_image": 1}
    status, _, err = _mllm_here(
        capsys, "eval", str(stage1_run), "--task", "retrieval", "--data", str(data), "--output", str(tmp_path / "s"),
        "--image-folder", str(synth_small), "--strict",
    )  # fmt: skip
    assert status != 0
    assert "not-there.png" in err


@pytest.fixture(scope="module")
def tiny_clip(tiny_components, tmp_path_factory) -> Path:
    """A random-init CLIPModel (text + vision halves) with the tiny tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(tiny_components["llama"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 64, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 48, "patch_size": 8,
        },
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    AutoImageProcessor.from_pretrained(tiny_components["clip-vision"]).save_pretrained(out)
    return out


def test_a_clip_dual_encoder_is_scored_by_its_own_cosine_similarity(
    tiny_clip: Path, synth_small: Path, tmp_path, capsys
) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    data = _caption_rows(synth_small, 10)
    done = _mllm(
        "eval", str(tiny_clip), "--task", "retrieval", "--data", str(data), "--output", str(tmp_path / "e"),
        "--batch-size", "64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["scorer"] == "dual-encoder"
    rows = json.loads(data.read_text())
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    pixels = AutoImageProcessor.from_pretrained(tiny_clip)(
        images=[Image.open(synth_small / r["image"]).convert("RGB") for r in rows], return_tensors="pt"
    )["pixel_values"]
    captions = [c for r in rows for c in r["captions"]]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tok(captions, padding=True, return_tensors="pt")).pooler_output
    sim = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    expected = retrieval_metrics(sim, [i for i, r in enumerate(rows) for _ in r["captions"]])
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    # ITM re-ranking needs the Q-Former's head: refused for a dual encoder, naming why
    status, _, err = _mllm_here(
        capsys, "eval", str(tiny_clip), "--task", "retrieval", "--data", str(data), "--rerank", "3"
    )
    assert status != 0 and "ITM" in err


def test_models_without_a_retrieval_head_and_misplaced_flags_are_refused(
    tiny_components, synth_small: Path, tmp_path, capsys
) -> None:
    data = _caption_rows(synth_small, 4)
    vision_only = _mllm(
        "eval", str(tiny_components["clip-vision"]), "--task", "retrieval", "--data", str(data)
    )
    assert vision_only.returncode != 0 and "no text half" in vision_only.stderr
    run_dir = tmp_path / "llava-run"
    run_dir.mkdir()
    (run_dir / "mllm_run.json").write_text("{}")
    status, _, err = _mllm_here(capsys, "eval", str(run_dir), "--task", "retrieval", "--data", str(data))
    assert status != 0 and "has no retrieval head" in err
    status, _, err = _mllm_here(
        capsys, "eval", str(tmp_path), "--task", "vqa", "--data", str(data), "--rerank", "5"
    )
    assert status != 0 and "--rerank is for --task retrieval" in err
    status, _, err = _mllm_here(
        capsys, "eval", str(tiny_components["clip-vision"]), "--task", "retrieval", "--data", str(data), "--template", "plain"
    )  # fmt: skip
    assert status != 0 and "--template" in err
