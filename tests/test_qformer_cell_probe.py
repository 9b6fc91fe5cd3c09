"""scripts.qformer_cell_probe runs as a user types it, for both connectors, and names a missing world."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("connector", [["--connector", "mlp"], ["--no-positions"], []])
def test_probe_prints_held_out_cell_accuracy(tiny_components, synth_small, connector) -> None:
    command = [sys.executable, "-m", "scripts.qformer_cell_probe", "--data", str(synth_small)]
    command += [
        "--tower",
        str(tiny_components["clip-vision"]),
        "--llm",
        str(tiny_components["llama"]),
        "--steps",
        "4",
        "--eval-every",
        "2",
        *connector,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = re.findall(r"^step +(\d+): held-out object cells .* (\d+\.\d)%$", done.stdout, re.MULTILINE)
    assert [int(s) for s, _ in steps] == [2, 4]
    assert all(0.0 <= float(a) <= 100.0 for _, a in steps)


def test_probe_without_a_world_says_how_to_build_it(tmp_path) -> None:
    command = [sys.executable, "-m", "scripts.qformer_cell_probe", "--data", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "scenes.jsonl not found" in done.stderr and "scripts.quickstart" in done.stderr
