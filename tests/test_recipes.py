"""Every shipped recipe validates with build_run_config; accelerate and DeepSpeed configs are consistent."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mllm.config import ConfigError, build_run_config, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
RUN_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.relative_to(RECIPES).parts)
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((RECIPES / "deepspeed").glob("*.json"))
FAMILIES = ("tiny", "llava-1.5", "siglip-qwen2.5")
STAGES = ("stage1_align", "stage2_instruct", "stage2_lora", "stage2_qlora")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(RECIPES)) for p in paths]


def _build(recipe: Path, overrides: list[str] | None = None):
    """build_run_config from the repo root (recipes name repo-relative DeepSpeed JSONs).

    Without a CUDA GPU, transformers refuses ``bf16`` unless ``use_cpu`` is set, so that one key is
    added there; every other key is validated as written.
    """
    extra = [] if torch.cuda.is_available() else ["use_cpu=true"]
    if "deepspeed" in load_recipe(recipe):
        pytest.importorskip("deepspeed")
    return build_run_config(recipe, [*extra, *(overrides or [])])


def _assert_released() -> None:
    """After the last RunConfig is dropped, no ZeRO-3 state leaks into later tests: a ZeRO-3
    TrainingArguments keeps a process-wide DeepSpeed weakref alive while it lives."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    gc.collect()
    assert not is_deepspeed_zero3_enabled()


def test_every_family_has_every_stage() -> None:
    for family in FAMILIES:
        for stage in STAGES:
            assert (RECIPES / family / f"{stage}.yaml").is_file(), f"{family}/{stage}.yaml is missing"


@pytest.mark.parametrize("recipe", RUN_RECIPES, ids=_ids(RUN_RECIPES))
def test_recipe_validates(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config = _build(recipe)
    stage = next((s for s in ("stage1_qformer", "stage2_generative") if recipe.stem.endswith(s)), recipe.stem)
    if stage == "stage1_qformer":  # BLIP-2 stage 1: the Q-Former alone
        assert config.model.qformer_pretrain and config.model.init_from is None
        assert config.tuning.tune_vision == "frozen"
    elif stage == "stage1_align":
        assert config.model.init_from is None
        assert (config.tuning.tune_vision, config.tuning.tune_connector, config.tuning.tune_llm) == (
            "frozen",
            "full",
            "frozen",
        )
    else:
        assert config.model.init_from, "a stage-2 recipe starts from its stage-1 output"
        expected = {
            "stage2_instruct": "full",
            "stage2_lora": "lora",
            "stage2_qlora": "qlora",
            "stage2_cot": "full",
            "stage2_generative": "frozen",  # BLIP-2 stage 2: Q-Former + projection, frozen LLM
        }
        expected = expected[stage]
        assert config.tuning.tune_llm == expected
    if config.training.deepspeed:
        assert Path(config.training.deepspeed).is_absolute(), "a shipped name resolves to the shipped file"
        assert Path(config.training.deepspeed).is_file()
    del config
    _assert_released()


def test_tiny_recipes_point_at_the_built_components(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    for stage in STAGES:
        config = _build(RECIPES / "tiny" / f"{stage}.yaml")
        assert config.model.vision_tower == "runs/tiny/clip-vision"
        assert config.model.model_name_or_path == "runs/tiny/llama"
        assert config.data.image_folder == "runs/data"
        expected = "runs/data/stage1_train.json" if stage == "stage1_align" else "runs/data/stage2_train.json"
        assert config.data.data_path == expected
        assert config.model.init_from == (None if stage == "stage1_align" else "runs/tiny-stage1")


def test_llava_recipes_carry_the_published_hyperparameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/v1_5/{pretrain,finetune,finetune_lora}.sh of haotian-liu/LLaVA, on 8 GPUs."""
    monkeypatch.chdir(REPO)
    gpus = 8
    stage1 = _build(RECIPES / "llava-1.5" / "stage1_align.yaml")
    t = stage1.training
    assert (stage1.model.vision_tower, stage1.model.model_name_or_path) == (
        "openai/clip-vit-large-patch14-336",
        "lmsys/vicuna-7b-v1.5",
    )
    assert (stage1.model.connector_type, stage1.model.connector_depth, stage1.model.vision_feature_layer) == (
        "mlp",
        2,
        -2,
    )
    assert t.per_device_train_batch_size * gpus * t.gradient_accumulation_steps == 256
    assert (t.learning_rate, t.num_train_epochs, t.warmup_steps, t.weight_decay) == (1e-3, 1, 0.03, 0.0)
    assert t.lr_scheduler_type == "cosine" and t.bf16 and t.activation_checkpointing
    assert stage1.data.model_max_length == 2048
    del stage1, t
    for stage, lr in (("stage2_instruct", 2e-5), ("stage2_lora", 2e-4), ("stage2_qlora", 2e-4)):
        config = _build(RECIPES / "llava-1.5" / f"{stage}.yaml")
        t = config.training
        assert t.per_device_train_batch_size * gpus * t.gradient_accumulation_steps == 128
        assert t.learning_rate == lr and config.data.template == "vicuna_v1"
        if stage == "stage2_instruct":  # `deepspeed: zero3` names the shipped JSON
            assert Path(t.deepspeed).resolve() == (RECIPES / "deepspeed" / "zero3.json").resolve()
        else:
            assert (config.tuning.lora_r, config.tuning.lora_alpha, config.tuning.connector_lr) == (
                128,
                256,
                2e-5,
            )
        del t, config
        _assert_released()


def test_bad_key_in_a_copied_recipe_names_the_key(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "tiny" / "stage1_align.yaml")
    recipe["learning_rat"] = 1e-3
    copy = tmp_path / "bad.yaml"
    copy.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="`learning_rat`.*learning_rate"):
        build_run_config(copy)


@pytest.mark.parametrize("config_file", ACCELERATE, ids=_ids(ACCELERATE))
def test_accelerate_config_parses(config_file: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(config_file))  # accelerate's own reader: unknown keys fail
    ds_file = config.deepspeed_config.get("deepspeed_config_file")
    if config.distributed_type.value == "DEEPSPEED":
        assert ds_file, "a DeepSpeed accelerate config names its JSON"
        assert (REPO / ds_file).is_file()
        assert Path(ds_file).stem == config_file.stem
        assert config.mixed_precision is None  # accelerate refuses it beside deepspeed_config_file
    else:
        assert ds_file is None


@pytest.mark.parametrize("ds_file", DEEPSPEED, ids=_ids(DEEPSPEED))
def test_deepspeed_json(ds_file: Path) -> None:
    config = json.loads(ds_file.read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == {"zero2": 2, "zero3": 3, "zero3_offload": 3}[ds_file.stem]
    offload = ds_file.stem.endswith("offload")
    assert ("offload_param" in zero) == offload and ("offload_optimizer" in zero) == offload
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"  # the HF Trainer fills these from the recipe
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"


def test_ddp_cpu_2proc_starts_two_gloo_processes(tmp_path: Path) -> None:
    """The 2-process CPU config really yields 2 ranks (MULTI_CPU, gloo) for TrainingArguments(use_cpu=True)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from transformers import TrainingArguments\n"
        f"a = TrainingArguments(output_dir={str(tmp_path / 'out')!r}, use_cpu=True, report_to='none')\n"
        "s = a.distributed_state\n"
        "line = f'RANK {a.process_index} {a.world_size} {s.distributed_type.value} {s.backend}'\n"
        # one file per rank: two ranks printing to one pipe can interleave their lines
        f"open({str(tmp_path)!r} + f'/rank{{a.process_index}}.txt', 'w').write(line)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29617"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(RECIPES / "accelerate" / "ddp_cpu_2proc.yaml"), "--main_process_port", "29617", str(probe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    ranks = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    assert ranks == ["RANK 0 2 MULTI_CPU gloo", "RANK 1 2 MULTI_CPU gloo"], result.stderr[-2000:]
