"""Recipe and override values are read as users write them; shipped DeepSpeed configs by name."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import mllm.config
from mllm.config import ConfigError, build_run_config, load_recipe, resolve_deepspeed, shipped_recipes_dir

REPO = Path(__file__).resolve().parents[1]
BASE = ["vision_tower=v", "model_name_or_path=l", "use_cpu=true", "output_dir=/tmp/mllm-config-test"]


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("vision_tower: v\nmodel_name_or_path: l\nuse_cpu: true\n" + text)
    return path


def test_yaml_boolean_words_stay_strings_for_string_fields(tmp_path: Path) -> None:
    """`save_strategy: no` failed before (`False is not a valid SaveStrategy`)."""
    recipe = _recipe(
        tmp_path, "save_strategy: no\neval_strategy: no\nbf16: no\npacking: yes\ntemplate: auto\n"
    )
    run = build_run_config(recipe)
    assert run.training.save_strategy == "no" and run.training.eval_strategy == "no"
    assert run.training.bf16 is False and run.data.packing is True
    assert run.source["save_strategy"] == "no" and run.source["packing"] is True
    assert run.data.template == "auto"


@pytest.mark.parametrize("word", ["no", "off", "false", "No"])
def test_boolean_word_overrides_of_a_choice_field(word: str) -> None:
    if word != "no":  # only `no` is a SaveStrategy; the others are refused naming the value
        with pytest.raises(ConfigError, match=word):
            build_run_config(None, [*BASE, f"save_strategy={word}"])
        return
    assert build_run_config(None, [*BASE, "save_strategy=no"]).training.save_strategy == "no"


def test_boolean_words_for_a_literal_field_are_named() -> None:
    with pytest.raises(ConfigError, match="`bad_data` must be one of .*'yes'"):
        build_run_config(None, [*BASE, "bad_data=yes"])


def test_resume_from_checkpoint_true_means_the_last_checkpoint() -> None:
    """`resume_from_checkpoint=true` was the path "True" before."""
    assert (
        build_run_config(None, [*BASE, "resume_from_checkpoint=true"]).training.resume_from_checkpoint is True
    )
    assert (
        build_run_config(None, [*BASE, "resume_from_checkpoint=false"]).training.resume_from_checkpoint
        is None
    )
    path = build_run_config(None, [*BASE, "resume_from_checkpoint=runs/x/checkpoint-5"])
    assert path.training.resume_from_checkpoint == "runs/x/checkpoint-5"


def test_load_recipe_gives_plain_yaml_values(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "save_strategy: no\n")
    assert load_recipe(recipe)["save_strategy"] is False  # plain YAML; build_run_config types it


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_names_the_shipped_configs_from_any_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = Path(resolve_deepspeed(name))
    assert resolved.is_file() and resolved == (REPO / "recipes" / "deepspeed" / f"{name}.json").resolve()


def test_deepspeed_paths_resolve_beside_the_recipe_then_in_the_shipped_recipes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = tmp_path / "recipes-of-mine"
    own.mkdir()
    (own / "ds.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert Path(resolve_deepspeed("ds.json", own)) == own / "ds.json"
    legacy = Path(resolve_deepspeed("recipes/deepspeed/zero3.json"))  # the old recipes' spelling
    assert legacy.is_file() and legacy.parent == shipped_recipes_dir() / "deepspeed"
    with pytest.raises(ConfigError, match="`deepspeed` is `nope.json`.*zero2"):
        resolve_deepspeed("nope.json", own)


def test_a_wheel_reads_the_recipes_it_installs_under_share(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not a checkout: the recipes come from <prefix>/share/mllm/recipes (setup.cfg data_files)."""
    monkeypatch.setattr(mllm.config, "__file__", str(tmp_path / "site-packages" / "mllm" / "config.py"))
    assert shipped_recipes_dir() == Path(sysconfig.get_path("data")) / "share" / "mllm" / "recipes"
    setup = (REPO / "setup.cfg").read_text()
    assert "share/mllm/recipes/deepspeed = recipes/deepspeed/*.json" in setup


def test_trl_is_an_optional_extra() -> None:
    setup = (REPO / "setup.cfg").read_text()
    requires = setup.split("install_requires =", 1)[1].split("\n[", 1)[0]
    assert "trl" not in requires
    assert "\ntrl =\n    trl>=" in setup


def test_config_module_imports_neither_torch_nor_transformers() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, mllm.config; print('torch' in sys.modules, 'transformers' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.stdout.split() == ["False", "False"], done.stderr
