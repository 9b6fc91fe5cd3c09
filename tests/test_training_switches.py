"""Training switches users expect, each a recipe key: it runs a step on the CPU, or it is refused
before any model loads with a message naming what is missing.

- ``gradient_checkpointing`` with frozen embeddings: the classic failure is reentrant checkpointing
  (LLaVA's setting) around layers whose input does not require grad, which leaves every LoRA weight
  without a gradient. Checked for LoRA, QLoRA and full tuning, with the connector frozen too so
  nothing before the LLM trains: every trainable weight gets a non-zero gradient and changes.
- ``torch_compile``: a compiled step with the ``aot_eager`` backend (dynamo + AOT autograd, the
  Trainer's own path) gives the uncompiled loss. The default inductor backend also trains on this
  CPU, but generates C++ per new padded shape: 2 steps took 165 s on 2 cores, too slow for a test.
- ``bf16`` runs on the CPU (bf16 weights, CPU autocast); ``fp16`` is refused there (accelerate
  would silently train in fp32).
- ``use_liger_kernel`` is refused without the liger-kernel package or a GPU; where it runs, mllm
  applies it to the LLM (the Trainer's own call finds no kernels for model type ``mllm``).
- ``attn_implementation: flash_attention_2`` without flash-attn / CUDA falls back to sdpa with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

import mllm.training.stages as stages
from mllm.config import ConfigError, build_run_config
from mllm.training.preflight import PreflightError, preflight
from tests.data_fixtures import save_tiny_lora_run

REPO = Path(__file__).resolve().parents[1]
REENTRANT = 'gradient_checkpointing_kwargs={"use_reentrant": true}'


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_tools.synth import generate_dataset

    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, num_scenes=8, seed=0, image_size=32)
    return out


def _recipe(tiny_components, data: Path, output_dir: Path) -> dict[str, object]:
    """A stage-2 LoRA recipe on the tiny components (the mapping a recipe YAML holds)."""
    return {
        "vision_tower": str(tiny_components["clip-vision"]),
        "model_name_or_path": str(tiny_components["llama"]),
        "data_path": str(data / "stage2_train.json"),
        "image_folder": str(data),
        "output_dir": str(output_dir),
        "tune_llm": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "max_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "logging_steps": 1,
        "disable_tqdm": True,
    }


def _run(tiny_components, data: Path, output_dir: Path, *overrides: str):
    flat = _recipe(tiny_components, data, output_dir)
    return build_run_config(None, [f"{k}={v}" for k, v in flat.items()] + list(overrides))


class Probe(TrainerCallback):
    """What the Trainer's model looks like while it trains: checkpointing on, dtypes, every trainable
    weight before and after, and its gradient at each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        self.llm_dtype = model.get_input_embeddings().weight.dtype
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {
                n: 0.0 if p.grad is None else float(p.grad.float().norm())
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def probe(monkeypatch) -> Probe:
    """A `Probe` on the trainer `stages.train` builds."""
    found = Probe()

    class ProbedTrainer(stages.MllmTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(found)

    monkeypatch.setattr(stages, "MllmTrainer", ProbedTrainer)
    return found


@pytest.fixture(scope="module")
def baseline_loss(tiny_components, data, tmp_path_factory) -> float:
    """The first step's loss of the plain LoRA run (fp32, eager)."""
    return stages.train(_run(tiny_components, data, tmp_path_factory.mktemp("baseline"))).train_loss


# ------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("tune_llm", ["lora", "qlora", "full"])
def test_gradient_checkpointing_reentrant_with_frozen_embeddings_trains_every_weight(
    tune_llm, tiny_components, data, tmp_path, probe
) -> None:
    run = _run(
        tiny_components,
        data,
        tmp_path,
        f"tune_llm={tune_llm}",
        "tune_connector=frozen",  # nothing before the LLM trains: the embedding output is the only way in
        "gradient_checkpointing=true",
        REENTRANT,
        "max_steps=2",
    )
    result = stages.train(run)
    assert result.global_step == 2 and math.isfinite(result.train_loss)
    assert probe.checkpointing, "gradient checkpointing was not on in the trained model"
    trained = [n for n in probe.before if "language_model" in n]
    if tune_llm == "full":
        assert len(trained) == len(probe.before)  # tower and connector frozen
        assert all(probe.grads[0][n] > 0 for n in trained), [n for n in trained if probe.grads[0][n] == 0]
    else:
        lora_a = [n for n in trained if ".lora_A." in n]
        lora_b = [n for n in trained if ".lora_B." in n]
        assert lora_a and len(lora_a) == len(lora_b) and len(lora_a) + len(lora_b) == len(trained)
        # B starts at zero, so step 1 reaches B only; from step 2 A gets its gradient too
        assert all(probe.grads[0][n] > 0 for n in lora_b), [n for n in lora_b if probe.grads[0][n] == 0]
        assert all(probe.grads[1][n] > 0 for n in trained), [n for n in trained if probe.grads[1][n] == 0]
    unchanged = [n for n in trained if torch.equal(probe.before[n], probe.after[n])]
    assert not unchanged, unchanged


# ------------------------------------------------------------------ torch_compile


def test_torch_compile_runs_a_step_with_the_uncompiled_loss(
    tiny_components, data, tmp_path, probe, baseline_loss
) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        run = _run(tiny_components, data, tmp_path, "torch_compile=true", "torch_compile_backend=aot_eager")
        result = stages.train(run)
        graphs, aot = counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"]
    finally:
        torch._dynamo.reset()
    assert graphs > 0 and aot > 0, dict(counters)  # the step really went through dynamo and AOT autograd
    assert result.global_step == 1
    assert result.train_loss == pytest.approx(baseline_loss, abs=1e-4)
    assert any(not torch.equal(probe.before[n], probe.after[n]) for n in probe.before if ".lora_B." in n)
    assert (tmp_path / "adapter_model.safetensors").is_file()  # saved from the uncompiled module


# ------------------------------------------------------------------ bf16 / fp16


def test_bf16_on_cpu_runs_a_step_in_bf16(tiny_components, data, tmp_path, probe, baseline_loss) -> None:
    result = stages.train(_run(tiny_components, data, tmp_path, "bf16=true"))
    assert probe.llm_dtype == torch.bfloat16  # the load dtype, as LLaVA trains
    assert result.global_step == 1
    assert result.train_loss == pytest.approx(baseline_loss, abs=0.05)  # bf16 rounding, same step
    assert result.train_loss != baseline_loss  # not an fp32 run under another name
    assert any(not torch.equal(probe.before[n], probe.after[n]) for n in probe.before if ".lora_B." in n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="transformers only refuses bf16 without a GPU")
def test_bf16_without_use_cpu_on_a_cpu_machine_names_use_cpu(tiny_components, data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="use_cpu"):
        _run(tiny_components, data, tmp_path, "bf16=true", "use_cpu=false")


def test_fp16_on_cpu_is_refused_before_loading(tiny_components, data, tmp_path) -> None:
    with pytest.raises(PreflightError, match=r"fp16=true needs a GPU.*bf16=true"):
        preflight(_run(tiny_components, data, tmp_path, "fp16=true"))


# ------------------------------------------------------------------ Liger kernels


def test_liger_kernel_refusal_names_what_is_missing(tiny_components, data, tmp_path) -> None:
    run = _run(tiny_components, data, tmp_path, "use_liger_kernel=true")
    missing = {
        "liger-kernel is not installed": importlib.util.find_spec("liger_kernel") is None,
        "triton is not installed": importlib.util.find_spec("triton") is None,
        "the run is on the CPU": run.training.device.type == "cpu",  # use_cpu=true
    }
    with pytest.raises(PreflightError) as err:
        preflight(run)
    message = str(err.value)
    assert "use_liger_kernel" in message and "mllm[liger]" in message
    for piece, is_missing in missing.items():
        assert (piece in message) == is_missing, (piece, message)


def test_liger_kernels_go_on_the_llm_not_the_wrapper(tiny_components, monkeypatch) -> None:
    """Where liger-kernel runs, Liger patches by model type: mllm hands it the LLM (model type
    llama here), whose kernels it has; the `mllm` wrapper would get none. The package is replaced by
    a recorder: the kernels themselves need a GPU."""
    from mllm.config import TuningArguments
    from mllm.models.adapters import apply_tuning
    from mllm.models.liger import apply_liger_to_llm
    from mllm.models.modeling_mllm import MllmForConditionalGeneration

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((model, kw))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = MllmForConditionalGeneration.from_components(
        str(tiny_components["clip-vision"]), str(tiny_components["llama"])
    )
    model = apply_tuning(model, TuningArguments(tune_llm="lora", lora_r=4, lora_alpha=8))
    llm = apply_liger_to_llm(model, {"rope": False})
    assert calls == [(llm, {"rope": False})]
    assert type(llm).__name__ == "LlamaForCausalLM" and llm.config.model_type == "llama"


# ------------------------------------------------------------------ attn_implementation


needs_no_flash = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
    reason="flash-attn runs here: there is nothing to fall back from",
)


def _save_tiny_full_run(components, out: Path) -> Path:
    """A run dir of format ``full`` (the LLM's weights saved), as `mllm train` saves one."""
    import dataclasses

    from transformers import AutoConfig

    from mllm.config import TuningArguments
    from mllm.models.adapters import apply_tuning
    from mllm.models.modeling_mllm import MllmForConditionalGeneration
    from mllm.models.processing_mllm import MllmProcessor
    from mllm.run_dir import RunRecord, save_run_dir

    vision, llm = str(components["clip-vision"]), str(components["llama"])
    tuning = TuningArguments(tune_llm="full")
    model = apply_tuning(MllmForConditionalGeneration.from_components(vision, llm), tuning)
    record = RunRecord.new(
        vision_tower=vision,
        model_name_or_path=llm,
        tuning=dataclasses.asdict(tuning),
        base_vocab_size=AutoConfig.from_pretrained(llm).vocab_size,
    )
    processor = MllmProcessor.from_components(vision, llm, model.config.num_image_tokens)
    return save_run_dir(model, out, processor=processor, record=record)


@needs_no_flash
@pytest.mark.parametrize("source", ["components", "trained run dir", "full run dir"])
def test_flash_attention_2_loads_as_sdpa_with_a_warning(source, tiny_components, tmp_path, caplog) -> None:
    from mllm.models.modeling_mllm import MllmForConditionalGeneration

    vision, llm = str(tiny_components["clip-vision"]), str(tiny_components["llama"])
    if source == "trained run dir":
        run_dir = save_tiny_lora_run(tiny_components, tmp_path / "run")
    elif source == "full run dir":
        run_dir = _save_tiny_full_run(tiny_components, tmp_path / "run")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mllm"):
        if source == "components":
            model = MllmForConditionalGeneration.from_components(
                vision, llm, attn_implementation="flash_attention_2"
            )
        else:
            model = MllmForConditionalGeneration.from_run_dir(
                run_dir, attn_implementation="flash_attention_2"
            )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.language_model.config._attn_implementation == "sdpa"
    warnings = [r.getMessage() for r in caplog.records if "flash_attention_2" in r.getMessage()]
    assert len(warnings) == 1 and "using sdpa" in warnings[0], warnings  # once per load


def _mllm_train(recipe: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLLM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "mllm", "train", str(recipe), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )


@needs_no_flash
def test_mllm_train_with_flash_attention_2_checkpointing_and_lora_as_typed(
    tiny_components, data, tmp_path
) -> None:
    """The user's recipe: LoRA, gradient checkpointing the way LLaVA ran it (reentrant, as a JSON
    string: a recipe is flat), flash_attention_2 on a machine without it."""
    out = tmp_path / "run"
    recipe = {
        **_recipe(tiny_components, data, out),
        "tune_connector": "frozen",
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": json.dumps({"use_reentrant": True}),
        "attn_implementation": "flash_attention_2",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = _mllm_train(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needs the flash-attn package" in done.stderr and "using sdpa" in done.stderr, done.stderr[-3000:]
    assert "mllm train: done: 1 steps" in done.stdout
    lora_b = {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if ".lora_B." in k}
    assert lora_b and all(bool(v.abs().sum() > 0) for v in lora_b.values())  # every B left zero-init


def test_mllm_train_refuses_liger_on_cpu_in_one_line(tiny_components, data, tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({**_recipe(tiny_components, data, tmp_path / "run"), "use_liger_kernel": True})
    )
    done = _mllm_train(path)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("mllm train: error:")]
    assert len(errors) == 1 and "use_liger_kernel" in errors[0] and "mllm[liger]" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "Loading weights" not in done.stderr  # before any model loads
