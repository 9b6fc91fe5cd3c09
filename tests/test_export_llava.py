"""`mllm.hub.export(..., to="llava")`: the folder loads in a fresh process that never imports mllm and
gives mllm's logits (1e-4) and greedy tokens; LoRA and QLoRA runs are merged first."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, set_seed

from mllm.config import TuningArguments
from mllm.models import MllmForConditionalGeneration, MllmProcessor
from mllm.models.adapters import apply_tuning, llm_quantization_config
from mllm.models.loading import load_model_and_processor
from mllm.run_dir import RunRecord, save_run_dir

PROMPT = "What color is the shape?"
MAX_NEW_TOKENS = 6


def make_run_dir(
    components: dict[str, Path],
    out: Path,
    *,
    vision: str = "clip-vision",
    llm: str = "llama",
    tune_llm: str = "frozen",
    config: dict | None = None,
    **architecture,
) -> Path:
    """A run dir as `mllm train` writes it, without training: every trainable weight (connector,
    LoRA A and B, added embedding rows) is perturbed so that a lost or misplaced one changes logits."""
    tuning = TuningArguments(
        tune_llm=tune_llm, lora_r=4, lora_alpha=8, lora_dropout=0.0, bnb_4bit_compute_dtype="float32"
    )
    set_seed(0)
    v, lm = str(components[vision]), str(components[llm])
    model = MllmForConditionalGeneration.from_components(
        v, lm, quantization_config=llm_quantization_config(tuning), **architecture
    )
    processor = MllmProcessor.from_components(v, lm, num_image_tokens=model.config.num_image_tokens)
    model = apply_tuning(model, tuning)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    record = RunRecord.new(
        vision_tower=v,
        model_name_or_path=lm,
        tuning=dataclasses.asdict(tuning),
        base_vocab_size=AutoConfig.from_pretrained(lm).vocab_size,
        config=config,
    )
    return save_run_dir(model, out, processor=processor, record=record)


def probe_image(path: Path) -> Path:
    image = Image.new("RGB", (40, 56), (30, 200, 40))
    for x in range(8, 24):
        for y in range(10, 30):
            image.putpixel((x, y), (220, 20, 20))
    image.save(path)
    return path


def mllm_inputs(processor, image: Image.Image):
    """What a user of mllm feeds the model: the chat template when the LLM has one, else raw text."""
    if processor.chat_template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        return processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, images=[image]
        )
    return processor(text=f"<image>\n{PROMPT}", images=[image])


@torch.no_grad()
def write_reference(run: Path, image_path: Path, out: Path) -> None:
    """mllm's input ids, logits and greedy tokens (LoRA as an adapter on the unquantised LLM)."""
    model, processor = load_model_and_processor(run, quantize=False)
    inputs = mllm_inputs(processor, Image.open(image_path))
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    torch.save(
        {"input_ids": inputs["input_ids"], "logits": logits, "generated": generated, "prompt": PROMPT}, out
    )


# Runs in a fresh interpreter: transformers and torch only, never mllm.
FRESH_CHECK = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

cases, image_path, remote = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
kw = {"trust_remote_code": True} if remote else {}
image = Image.open(image_path)
report = []
for folder, reference in cases:
    ref = torch.load(reference)
    processor = AutoProcessor.from_pretrained(folder, **kw)
    model = AutoModelForImageTextToText.from_pretrained(folder, **kw).eval()
    if processor.chat_template:  # as a transformers user calls it: the image inline, tokenized by the processor
        content = [{"type": "image", "path": image_path}, {"type": "text", "text": ref["prompt"]}]
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt",
        )
    else:
        inputs = processor(text="<image>\n" + ref["prompt"], images=image, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ref["input_ids"]), (folder, inputs["input_ids"], ref["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=ref["generated"].shape[1] - inputs["input_ids"].shape[1], do_sample=False)
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff <= 1e-4, (folder, diff)
    assert torch.equal(generated, ref["generated"]), (folder, generated, ref["generated"])
    report.append({"folder": folder, "class": type(model).__name__, "processor": type(processor).__name__, "max_abs_logit_diff": diff})
assert "mllm" not in sys.modules and not any(name.startswith("mllm.") for name in sys.modules)
print(json.dumps(report))
"""


def run_fresh(cases: list[tuple[Path, Path]], image: Path, cwd: Path, remote: bool = False) -> list[dict]:
    """Load each (folder, reference) in one new interpreter started outside the repo, without PYTHONPATH."""
    script = cwd / "fresh_check.py"
    script.write_text(FRESH_CHECK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            json.dumps([[str(f), str(r)] for f, r in cases]),
            str(image),
            str(int(remote)),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


CASES = [
    # (vision, llm, tune_llm, architecture)
    ("clip-vision", "llama", "frozen", {"connector_type": "mlp"}),
    ("siglip-vision", "qwen2", "frozen", {"connector_type": "mlp", "connector_hidden_act": "silu"}),
    ("clip-vision", "gpt2", "frozen", {"connector_type": "linear"}),
    ("siglip-vision", "llama", "lora", {"connector_type": "linear", "vision_feature_layer": -1}),
    ("clip-vision", "qwen2", "qlora", {"connector_type": "mlp", "vision_feature_select_strategy": "full"}),
]


def test_llava_export_matches_mllm_in_a_fresh_process(tiny_components, tmp_path):
    from mllm.hub import export

    image = probe_image(tmp_path / "probe.png")
    cases = []
    for index, (vision, llm, tune_llm, architecture) in enumerate(CASES):
        run = make_run_dir(
            tiny_components,
            tmp_path / f"run{index}",
            vision=vision,
            llm=llm,
            tune_llm=tune_llm,
            **architecture,
        )
        folder = export(run, tmp_path / f"llava{index}", to="llava")
        assert json.loads((folder / "config.json").read_text())["model_type"] == "llava"
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.py"))
        assert not (folder / "adapter_config.json").exists()
        write_reference(run, image, tmp_path / f"ref{index}.pt")
        cases.append((folder, tmp_path / f"ref{index}.pt"))
    report = run_fresh(cases, image, tmp_path)
    print(json.dumps(report, indent=1))
    assert [r["class"] for r in report] == ["LlavaForConditionalGeneration"] * len(CASES)
    assert [r["processor"] for r in report] == ["LlavaProcessor"] * len(CASES)


def test_llava_export_refuses_what_llava_cannot_express(tiny_components, tmp_path):
    from mllm.hub import export

    run = make_run_dir(tiny_components, tmp_path / "run", connector_type="mlp", connector_depth=3)
    with pytest.raises(ValueError, match="depth 3.*remote-code"):
        export(run, tmp_path / "out", to="llava")
    assert not (tmp_path / "out").exists()


def test_linear_connector_is_exact_as_an_identity_second_layer(tiny_components, tmp_path):
    """In-process: the Llava projector of a linear connector returns the connector's output bit for bit."""
    from transformers import LlavaForConditionalGeneration

    from mllm.hub import export

    run = make_run_dir(tiny_components, tmp_path / "run", connector_type="linear")
    folder = export(run, tmp_path / "llava", to="llava")
    mllm_model, _ = load_model_and_processor(run)
    llava = LlavaForConditionalGeneration.from_pretrained(folder)
    assert llava.config.projector_hidden_act == "linear"
    features = torch.randn(2, 5, mllm_model.config.vision_config.hidden_size)
    with torch.no_grad():
        assert torch.equal(llava.model.multi_modal_projector(features), mllm_model.connector(features))


def test_qlora_run_exports_in_16_bit(tiny_components, tmp_path):
    """A QLoRA run is merged onto the unquantised LLM and written in the dtype asked (bfloat16)."""
    from safetensors import safe_open
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm.hub import export

    run = make_run_dir(tiny_components, tmp_path / "run", llm="qwen2", tune_llm="qlora")
    folder = export(run, tmp_path / "llava", to="llava", dtype=torch.bfloat16)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    reference, processor = load_model_and_processor(run, quantize=False)
    image = Image.open(probe_image(tmp_path / "probe.png"))
    with torch.no_grad():
        expected = reference(**mllm_inputs(processor, image)).logits
        exported = AutoProcessor.from_pretrained(folder)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        prompt = exported.apply_chat_template(messages, add_generation_prompt=True)
        inputs = exported(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
        got = llava(**inputs).logits.float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bfloat16 rounding only (8 bits of mantissa through a 2-layer LLM), not a lost or misplaced weight
    assert (got - expected).abs().max() < 0.25 and (got - expected).abs().mean() < 0.02
