"""Packing through `mllm train`'s code path (stages.train -> MllmTrainer): packed rows give the same
per-token loss and the same update as padded batches (sdpa and eager), first-fit-decreasing rows
respect the token budget, and length-grouped batches hold one modality of similar length."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import build_run_config
from mllm.data.collator import PackingCollator
from mllm.data.sampler import ModalityLengthGroupedSampler, pack_first_fit_decreasing
from mllm.training.stages import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_tools.synth import generate_dataset

    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, num_scenes=6, seed=0, image_size=32)
    records = json.loads((out / "stage2_train.json").read_text())
    # a few text-only records and long answers: real length variance, both modalities
    records += [
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": "Say shapes."},
                {"from": "gpt", "value": "circle square " * (i + 1)},
            ],
        }
        for i in range(4)
    ]
    (out / "mixed.json").write_text(json.dumps(records))
    return out


def _run(tiny_components, data: Path, out: Path, attn: str, *more: str):
    run = build_run_config(
        None,
        [
            f"vision_tower={tiny_components['clip-vision']}",
            f"model_name_or_path={tiny_components['llama']}",
            f"image_folder={data}",
            f"data_path={data / 'mixed.json'}",
            f"output_dir={out}",
            f"attn_implementation={attn}",
            "tune_llm=full",
            "per_device_train_batch_size=64",  # every sample (or row) in the one step
            "max_steps=1",
            "optim=sgd",
            "learning_rate=0.5",
            "use_cpu=true",
            "save_strategy=no",
            "disable_tqdm=true",
            "group_by_modality_length=false",
            *more,
        ],
    )
    result = train(run)
    return result, load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() else None


@pytest.fixture(scope="module")
def padded_runs(tiny_components, data, tmp_path_factory):
    """attn -> the padded run (loss, weights), trained once per attention implementation."""
    runs: dict[str, tuple] = {}

    def get(attn: str):
        if attn not in runs:
            runs[attn] = _run(tiny_components, data, tmp_path_factory.mktemp(f"padded-{attn}"), attn)
        return runs[attn]

    return get


@pytest.mark.parametrize("budget", [100_000, 160], ids=["one-row", "several-rows"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_training_step_equals_the_padded_one(
    tiny_components, data, tmp_path, padded_runs, attn, budget
):
    padded, w_padded = padded_runs(attn)
    packed, w_packed = _run(
        tiny_components, data, tmp_path / "packed", attn, "packing=true", f"packing_max_length={budget}"
    )
    # the mean loss over the same supervised tokens, and the same gradient step
    assert packed.train_loss == pytest.approx(padded.train_loss, rel=1e-5)
    assert w_padded is not None and w_packed is not None
    for name, tensor in w_padded.items():
        torch.testing.assert_close(w_packed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_first_fit_decreasing_rows_respect_the_budget_and_hold_every_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(500)] + [700]  # one longer than the budget
    rows = pack_first_fit_decreasing(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [row for row in rows if sum(lengths[i] for i in row) > 512] == [[500]]  # alone in its row
    # first-fit decreasing is within 11/9 OPT + 1 rows; the volume bound is a lower bound on OPT
    assert len(rows) <= 11 / 9 * (sum(lengths) / 512 + 1) + 1


def test_packed_rows_restart_positions_and_pad_as_a_block_of_their_own():
    def sample(n, images=0):
        s = {"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1), "skipped": []}
        if images:
            s["pixel_values"] = torch.zeros(images, 3, 4, 4)
        return s

    batch = PackingCollator(max_length=8, pad_token_id=0)([[sample(3, 1), sample(4)], [sample(5)]])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 2, 3, 4], [-100, 2, 3, 4, 5, -100, -100]]
    assert batch["input_ids"][1, 5:].tolist() == [0, 0] and "attention_mask" not in batch
    assert batch["pixel_values"].shape[0] == 1


def test_length_grouped_batches_hold_one_modality_of_similar_length():
    rng = random.Random(1)
    modality = [rng.random() < 0.6 for _ in range(400)]
    lengths = [rng.randint(500, 900) if m else rng.randint(10, 400) for m in modality]
    batch = 8
    order = list(ModalityLengthGroupedSampler(lengths, modality, batch_size=batch, seed=0))
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    assert sorted(order) == list(range(400))
    mixed = [b for b in batches if len({modality[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only where the two modalities' short tails meet at the end

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = list(range(400))
    random.Random(2).shuffle(shuffled)
    assert padding(batches) < 0.2 * padding([shuffled[i : i + batch] for i in range(0, 400, batch)])
