"""The stage-beam benchmark runs as a user types it and prints one comparison line per N."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stage_beam_bench_prints_a_speed_up_per_beam_count() -> None:
    command = [sys.executable, "-m", "scripts.bench.stage_beam", "--questions", "1", "--beams", "2", "3"]
    command += ["--max-stage-tokens", "4", "--max-judge-tokens", "4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("N=")]
    assert [line.split(":")[0] for line in lines] == ["N=2", "N=3"]
    for line in lines:  # the image is encoded once per question by mllm, once per call by the reference
        reference = re.search(r"reference [\d.]+ s/q, \d+ tokens/q, \d+ forwards/q, vision (\d+)/q", line)
        assert reference and int(reference.group(1)) > 1
        assert re.search(r"mllm \(bracket\) [\d.]+ s/q, \d+ tokens/q, \d+ forwards/q, vision 1/q", line)
        assert re.search(r"\| [\d.]+x$", line)
