"""The frozen-tower feature cache: same loss as running the tower (which then never runs), a change of
any key refused, a partial or damaged cache refused and rebuilt, the size estimate printed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mllm.config import ConfigError, build_run_config
from mllm.data.feature_cache import (
    CorruptCacheError,
    FeatureCache,
    FeatureKey,
    MissingCacheError,
    StaleCacheError,
    build_cache,
    estimate_bytes,
    feature_key,
    human_bytes,
)
from mllm.training.cache_features import cache_features
from mllm.training.stages import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_tools.synth import generate_dataset

    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, num_scenes=6, seed=0, image_size=32)
    return out


def _overrides(tiny_components, data: Path, out: Path, *more: str) -> list[str]:
    return [
        f"vision_tower={tiny_components['clip-vision']}",
        f"model_name_or_path={tiny_components['llama']}",
        f"image_folder={data}",
        f"data_path={data / 'stage1_train.json'}",
        f"output_dir={out}",
        "per_device_train_batch_size=4",
        "use_cpu=true",
        "logging_steps=1",
        "max_steps=3",
        "save_strategy=no",
        "learning_rate=1e-2",
        "disable_tqdm=true",
        "group_by_modality_length=false",
        *more,
    ]


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_training_from_the_cache_gives_the_same_loss_and_never_runs_the_tower(
    tiny_components, data, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "cache"
    lines: list[str] = []
    plain = train(build_run_config(None, _overrides(tiny_components, data, tmp_path / "plain")))
    run = build_run_config(
        None,
        _overrides(
            tiny_components,
            data,
            tmp_path / "cached",
            f"vision_feature_cache={cache_dir}",
            "vision_feature_cache_dtype=float32",
        ),
    )
    cache = cache_features(run, batch_size=4, log=lines.append)
    assert len(cache) > 0 and "to write" in lines[-1] and "per image" in lines[-1]

    def no_tower(*args, **kwargs):
        raise AssertionError("the vision tower ran although the features are cached")

    from transformers import CLIPVisionModel

    monkeypatch.setattr(CLIPVisionModel, "forward", no_tower)
    cached = train(run)
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "cached")),
        torch.tensor(_losses(tmp_path / "plain")),
        rtol=1e-4,
        atol=1e-5,
    )
    assert cached.global_step == plain.global_step == 3
    # a second cache-features on an up-to-date cache encodes nothing
    monkeypatch.undo()
    lines.clear()
    cache_features(run, log=lines.append)
    assert ", 0 to encode" in lines[-1]


def test_a_cache_needs_a_frozen_tower_and_an_existing_folder(tiny_components, data, tmp_path):
    base = _overrides(tiny_components, data, tmp_path / "o", f"vision_feature_cache={tmp_path / 'none'}")
    with pytest.raises(MissingCacheError, match="mllm cache-features"):
        train(build_run_config(None, base))
    with pytest.raises(ConfigError, match="tune_vision: frozen"):
        train(build_run_config(None, [*base, "tune_vision=full"]))


KEY = FeatureKey("tower", "abc", -2, True, '{"size": 32}', "float16")


def _tiny_cache(root: Path, key: FeatureKey = KEY, n: int = 3) -> list[Path]:
    refs = []
    for i in range(n):
        p = root.parent / f"img{i}.bin"
        p.write_bytes(bytes([i]) * 10)
        refs.append(p)
    encode = lambda items: torch.stack([torch.full((4, 8), float(i)) for i in items])  # noqa: E731
    load = lambda ref: int(Path(ref).read_bytes()[0])  # noqa: E731
    build_cache(root, key, refs, load, encode, (4, 8), batch_size=2, shard_bytes=64, log=lambda _: None)
    return refs


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(FeatureKey)])
def test_any_key_change_is_refused_naming_the_field(tmp_path, field):
    _tiny_cache(tmp_path / "c")
    current = getattr(KEY, field)
    if isinstance(current, bool):
        changed = not current
    elif isinstance(current, int):
        changed = current + 1
    else:
        changed = "bfloat16" if field == "dtype" else current + "x"
    with pytest.raises(StaleCacheError, match=field):
        FeatureCache.open(tmp_path / "c", dataclasses.replace(KEY, **{field: changed}))


def test_feature_key_follows_the_tower_weights_layer_cls_transform_and_dtype(tiny_components):
    from mllm.models.modeling_mllm import MllmForConditionalGeneration
    from mllm.models.processing_mllm import MllmProcessor

    vision, llm = str(tiny_components["clip-vision"]), str(tiny_components["llama"])
    model = MllmForConditionalGeneration.from_components(vision, llm)
    proc = MllmProcessor.from_components(vision, llm, num_image_tokens=model.config.num_image_tokens)
    key = feature_key(model, proc.image_processor, vision, "float16")
    assert key == feature_key(model, proc.image_processor, vision, "float16")  # deterministic
    assert feature_key(model, proc.image_processor, vision, "bfloat16").dtype == "bfloat16"
    model.config.vision_feature_layer = -1
    assert feature_key(model, proc.image_processor, vision, "float16").feature_layer == -1
    model.config.vision_feature_layer = key.feature_layer
    model.config.vision_feature_select_strategy = "full"
    assert feature_key(model, proc.image_processor, vision, "float16").drop_cls is False
    model.config.vision_feature_select_strategy = "default"
    proc.image_processor.image_mean = [0.1, 0.2, 0.3]
    assert feature_key(model, proc.image_processor, vision, "float16").image_transform != key.image_transform
    with torch.no_grad():
        next(model.vision_tower.parameters()).add_(1e-3)
    moved = feature_key(model, proc.image_processor, vision, "float16")
    assert moved.weights_sha256 != key.weights_sha256


def _shard(root: Path) -> Path:
    return sorted(root.glob("shard-*.safetensors"))[0]


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda root: (root / "manifest.json").unlink(), "interrupted"),
        (lambda root: _shard(root).unlink(), "missing"),
        (lambda root: _shard(root).write_bytes(_shard(root).read_bytes()[:-5]), "truncated"),
        (lambda root: (root / "manifest.json").write_text("{not json"), "damaged"),
        (lambda root: _shard(root).write_bytes(b"\xff" * len(_shard(root).read_bytes())), "cannot be read"),
    ],
    ids=["no-manifest", "missing-shard", "truncated-shard", "bad-manifest", "bad-header"],
)
def test_a_partial_or_damaged_cache_is_refused_then_rebuilt(tmp_path, damage, match):
    root = tmp_path / "c"
    refs = _tiny_cache(root)
    damage(root)
    with pytest.raises(CorruptCacheError, match=match):
        FeatureCache.open(root, KEY)
    _tiny_cache(root)  # cache-features rebuilds
    cache = FeatureCache.open(root, KEY, verify=True)
    assert [float(cache.get(r)[0, 0]) for r in refs] == [0.0, 1.0, 2.0]


def test_a_flipped_data_byte_is_found_by_verify(tmp_path):
    root = tmp_path / "c"
    _tiny_cache(root)
    shard = _shard(root)
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    FeatureCache.open(root, KEY)  # structure intact: training's quick check passes
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        FeatureCache.open(root, KEY, verify=True)


def test_images_are_keyed_by_content_and_a_changed_file_is_missing(tmp_path):
    root = tmp_path / "c"
    refs = _tiny_cache(root)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(refs[1].read_bytes())
    cache = FeatureCache.open(root, KEY)
    assert float(cache.get(copy)[0, 0]) == 1.0 and cache.missing([copy]) == []
    refs[2].write_bytes(b"other content")
    assert cache.missing(refs) == [refs[2]]


def test_size_estimate_of_llava_stage1():
    # LLaVA-1.5 stage 1: 558K images, CLIP-L/336 layer -2 without CLS: 576 x 1024, fp16
    assert human_bytes(estimate_bytes(558_128, 576, 1024, "float16")) == "658.4 GB"


def test_stage2_from_init_from_with_packing_reads_the_cache(tiny_components, data, tmp_path, monkeypatch):
    stage1 = tmp_path / "stage1"
    train(build_run_config(None, _overrides(tiny_components, data, stage1, "max_steps=1")))
    stage2 = [
        f"init_from={stage1}",
        f"data_path={data / 'stage2_train.json'}",
        "tune_llm=full",
        "packing=true",
        "packing_max_length=128",
        "template=",
    ]
    plain = build_run_config(None, _overrides(tiny_components, data, tmp_path / "plain", *stage2))
    cached = build_run_config(
        None,
        _overrides(
            tiny_components, data, tmp_path / "cached", *stage2, f"vision_feature_cache={tmp_path / 'c2'}"
        ),
    )
    cache_features(cached, log=lambda _: None)  # fp16, the default
    train(plain)
    from transformers import CLIPVisionModel

    monkeypatch.setattr(
        CLIPVisionModel, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran"))
    )
    train(cached)
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "cached")),
        torch.tensor(_losses(tmp_path / "plain")),
        rtol=2e-3,
        atol=2e-3,
    )
