"""`mllm.hub.export(..., to="remote-code")`: Q-Former and deeper-MLP runs load with trust_remote_code=True
in a fresh process that never imports mllm, with mllm's logits (1e-4) and greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_export_llava import make_run_dir, probe_image, run_fresh, write_reference

CASES = [
    # (vision, llm, tune_llm, architecture)
    ("clip-vision", "qwen2", "frozen", {"connector_type": "qformer", "num_query_tokens": 4}),
    ("siglip-vision", "gpt2", "frozen", {"connector_type": "mlp", "connector_depth": 3}),
    ("clip-vision", "llama", "lora", {"connector_type": "qformer", "num_query_tokens": 3}),
    # learned vision positions (qformer_vision_positions): the remote copy must add them as mllm does
    (
        "clip-vision",
        "qwen2",
        "frozen",
        {"connector_type": "qformer", "num_query_tokens": 2, "positions": True},
    ),
]


def _with_positions(vision: Path, architecture: dict) -> dict:
    """``architecture`` with a Q-Former config that has a position embedding per vision token."""
    from transformers import Blip2QFormerConfig

    from mllm.models.vision import num_vision_tokens, vision_config_from

    architecture = dict(architecture)
    if architecture.pop("positions", False):
        config = vision_config_from(str(vision))
        architecture["qformer_config"] = Blip2QFormerConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=1,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=2 * config.hidden_size,
            encoder_hidden_size=config.hidden_size,
            num_vision_positions=num_vision_tokens(config, "default"),
        )
    return architecture


def test_remote_code_export_matches_mllm_in_a_fresh_process(tiny_components, tmp_path):
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
            **_with_positions(tiny_components[vision], architecture),
        )
        folder = export(run, tmp_path / f"remote{index}", to="remote-code")
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "mllm_remote"
        assert "AutoModelForImageTextToText" in config["auto_map"]
        assert sorted(p.name for p in folder.glob("*.py")) == [
            "configuration_mllm_remote.py",
            "modeling_mllm_remote.py",
            "processing_mllm_remote.py",
        ]
        for code in folder.glob("*.py"):
            assert "mllm." not in code.read_text() and "import mllm" not in code.read_text()
        assert not list(folder.glob("*.bin")) and not (folder / "mllm_run.json").exists()
        write_reference(run, image, tmp_path / f"ref{index}.pt")
        cases.append((folder, tmp_path / f"ref{index}.pt"))
    report = run_fresh(cases, image, tmp_path, remote=True)
    print(json.dumps(report, indent=1))
    assert [r["class"] for r in report] == ["MllmRemoteForConditionalGeneration"] * len(CASES)
    assert [r["processor"] for r in report] == ["MllmRemoteProcessor"] * len(CASES)
