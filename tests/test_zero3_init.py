"""Building the model under DeepSpeed ZeRO-3 (the path `accelerate launch` with a ZeRO-3 config takes).

Runs in a subprocess: it sets up a one-process gloo group and transformers' global ZeRO-3 flag, which
must not leak into other tests. DeepSpeed builds a small CPU communication op the first time (about a
minute, then cached), so this needs a C++ compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import os, sys
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from transformers.integrations import HfDeepSpeedConfig
zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
from mllm import MllmForConditionalGeneration
model = MllmForConditionalGeneration.from_components(sys.argv[1], sys.argv[2])
print("PARTITIONED", sum(hasattr(p, "ds_id") for p in model.parameters()))
print("NOT " + " ".join(n for n, p in model.named_parameters() if not hasattr(p, "ds_id")))
"""


def test_from_components_builds_partitioned_under_zero3(tiny_components, tmp_path):
    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("DeepSpeed's CPU communication op needs a C++ compiler")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29531",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_components["clip-vision"]), str(tiny_components["llama"])],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(x.split(" ", 1) for x in result.stdout.splitlines() if x.startswith(("PARTITIONED", "NOT")))
    assert int(lines["PARTITIONED"]) > 0
    # The pretrained tower and LLM load sharded (zero.Init). Left whole until the DeepSpeed engine
    # converts them at the start of training: the new connector and the embedding and head that were
    # resized for the `<image>` token.
    left_whole = lines["NOT"].split()
    assert all(
        n.startswith("connector.") or n.endswith(("embed_tokens.weight", "lm_head.weight"))
        for n in left_whole
    ), left_whole
