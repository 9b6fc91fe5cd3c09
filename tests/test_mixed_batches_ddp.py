"""`mllm train` in 2 CPU processes (accelerate launch, DDP over gloo) on mixed image / text-only data:
both ranks end with the same weights, every sample is loaded once per epoch (sharded, not
duplicated), and the saved run dir is rank 0's model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_two_process_stage2_run_is_sharded_and_in_sync(tiny_components, tmp_path):
    from data_tools.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, num_scenes=6, seed=0, image_size=32)
    records = json.loads((data / "stage2_train.json").read_text())[:14]
    records += [  # text-only samples: some batches hold no image (the dummy pass keeps ranks in step)
        {
            "id": f"t{i}",
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "two " * i}],
        }
        for i in range(1, 3)
    ]
    assert len(records) == 16  # 2 ranks x 2 per device x 4 steps: no uneven last batch to pad
    (data / "mixed.json").write_text(json.dumps(records))
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "vision_tower": str(tiny_components["clip-vision"]),
                "model_name_or_path": str(tiny_components["llama"]),
                "data_path": str(data / "mixed.json"),
                "image_folder": str(data),
                "tune_llm": "full",
                "per_device_train_batch_size": 2,
                "num_train_epochs": 1,
                "learning_rate": 1e-2,
                "use_cpu": True,
                "save_strategy": "no",
                "logging_steps": 1,
                "disable_tqdm": True,
                "dataloader_num_workers": 0,
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    probe = tmp_path / "probe"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(REPO / "recipes/accelerate/ddp_cpu_2proc.yaml"), "--main_process_port", "29631"]
    cmd += [str(REPO / "tests/ddp_train_probe.py"), str(probe), str(recipe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mllm train: done: 4 steps" in result.stdout, result.stdout[-2000:]
    seen = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8 and sorted(seen[0] + seen[1]) == list(range(16))
    ranks = [torch.load(probe / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, tensor in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], tensor, rtol=0, atol=0, msg=name)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, ranks[0][name], rtol=0, atol=0, msg=name)
