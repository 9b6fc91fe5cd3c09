"""Text-only and mixed batches: records without images train, and a training batch with no image still
runs the tower and the connector with a zero weight (the ZeRO-3 / DDP dummy pass), leaving the loss
unchanged and the connector's gradient present and zero."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import build_run_config
from mllm.data.collator import MllmCollator
from mllm.data.dataset import SupervisedDataset
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor
from mllm.training.stages import train
from tests.data_fixtures import image, record


@pytest.fixture(scope="module")
def model_and_processor(tiny_components):
    vision, llm = str(tiny_components["clip-vision"]), str(tiny_components["llama"])
    torch.manual_seed(0)
    model = MllmForConditionalGeneration.from_components(vision, llm, attn_implementation="eager")
    proc = MllmProcessor.from_components(vision, llm, num_image_tokens=model.config.num_image_tokens)
    return model, proc


def _batch(proc, records):
    items = [SupervisedDataset(records, proc, None, 512)[i] for i in range(len(records))]
    batch = MllmCollator(proc.tokenizer.pad_token_id)(items)
    batch.pop("skipped")
    return batch


@pytest.mark.parametrize("cached", [False, True], ids=["tower", "cached-features"])
def test_a_text_only_training_batch_runs_a_zero_weighted_dummy_pass(model_and_processor, cached, monkeypatch):
    model, proc = model_and_processor
    batch = _batch(proc, [record("t1", ("How many squares?", "two")), record("t2", ("Shapes?", "a circle"))])
    model.train()
    model.vision_features_cached = cached
    tower_calls = []
    monkeypatch.setattr(model.vision_tower, "forward", _spy(model.vision_tower.forward, tower_calls))
    try:
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
    finally:
        model.vision_features_cached = False
    with torch.no_grad():  # the plain LLM on the same embeddings: the reference loss
        embeds = model.get_input_embeddings()(batch["input_ids"])
        reference = model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert out.loss.item() == pytest.approx(reference.item(), abs=0, rel=0)  # bit-identical
    grads = [p.grad for p in model.connector.parameters()]
    assert grads and all(g is not None for g in grads)  # the connector took part in backward
    assert all(bool((g == 0).all()) for g in grads)  # ... with a zero gradient
    assert len(tower_calls) == (0 if cached else 1)  # cached features: the tower runs on no rank


def test_no_dummy_pass_outside_training(model_and_processor, monkeypatch):
    model, proc = model_and_processor
    batch = _batch(proc, [record("t1", ("How many squares?", "two"))])
    calls = []
    monkeypatch.setattr(model.vision_tower, "forward", _spy(model.vision_tower.forward, calls))
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert calls == []


def test_a_batch_with_images_and_text_only_samples_trains(model_and_processor):
    model, proc = model_and_processor
    batch = _batch(
        proc,
        [
            record("a", ("<image>\nWhat color?", "red"), images=(image((255, 0, 0)),)),
            record("t", ("Hi?", "two")),
        ],
    )
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    assert any(bool(p.grad.abs().sum() > 0) for p in model.connector.parameters())


def _spy(forward, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    return wrapped


def test_a_text_only_dataset_trains_and_leaves_the_connector_as_it_was(
    tiny_components, tmp_path, monkeypatch
):
    data = tmp_path / "text.json"
    rows = [
        {
            "id": f"t{i}",
            "conversations": [{"from": "human", "value": f"Count {i}."}, {"from": "gpt", "value": "one two"}],
        }
        for i in range(4)
    ]
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    run = build_run_config(
        None,
        [
            f"vision_tower={tiny_components['clip-vision']}",
            f"model_name_or_path={tiny_components['llama']}",
            f"data_path={data}",
            f"output_dir={out}",
            "tune_llm=full",
            "per_device_train_batch_size=2",
            "max_steps=2",
            "optim=sgd",
            "learning_rate=0.5",
            "use_cpu=true",
            "save_strategy=no",
            "disable_tqdm=true",
        ],
    )
    import mllm.training.stages as stages

    initial: dict[str, torch.Tensor] = {}
    real_apply_tuning = stages.apply_tuning

    def remember_connector(model, *args, **kwargs):
        initial.update({f"connector.{k}": v.clone() for k, v in model.connector.state_dict().items()})
        return real_apply_tuning(model, *args, **kwargs)

    monkeypatch.setattr(stages, "apply_tuning", remember_connector)
    result = train(run)
    assert result.global_step == 2 and result.train_loss == result.train_loss  # trained, no NaN
    weights = load_file(str(out / "model.safetensors"))
    assert initial and all(torch.equal(weights[n], t) for n, t in initial.items())  # zero gradient, SGD
    assert result.train_loss > 0
