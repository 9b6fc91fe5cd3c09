"""Run `mllm train` as one rank of a distributed launch and record what this rank did (a test helper).

    accelerate launch --config_file recipes/accelerate/ddp_cpu_2proc.yaml tests/ddp_train_probe.py \
        PROBE_DIR RECIPE.yaml key=value ...

Writes PROBE_DIR/rank{R}.pt (the rank's model state dict after training) and PROBE_DIR/rank{R}.json
(the dataset indices this rank loaded, in order).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from mllm.cli import main
from mllm.data.dataset import SupervisedDataset
from mllm.training.trainer import MllmTrainer


def _record(probe: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    seen: list[int] = []
    get_item, train = SupervisedDataset.__getitem__, MllmTrainer.train

    def getitem(self, index):
        seen.append(int(index))
        return get_item(self, index)

    def train_and_dump(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        torch.save(
            {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, probe / f"rank{rank}.pt"
        )
        (probe / f"rank{rank}.json").write_text(json.dumps(seen))
        return output

    SupervisedDataset.__getitem__ = getitem
    MllmTrainer.train = train_and_dump


if __name__ == "__main__":
    probe_dir = Path(sys.argv[1])
    probe_dir.mkdir(parents=True, exist_ok=True)
    _record(probe_dir)
    raise SystemExit(main(["train", *sys.argv[2:]]))
