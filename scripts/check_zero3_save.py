"""Check, on a GPU machine, that checkpoints written under DeepSpeed ZeRO-3 hold the real weights.

For each tiny recipe (LoRA and full tuning) it trains a few steps through
`accelerate launch --config_file recipes/accelerate/zero3.yaml` (one process, so every parameter is a
ZeRO-3 placeholder that only a gather fills), dumps the live parameters gathered after training, then,
in this process (ZeRO-3 off), loads the final output dir and the last ``checkpoint-N`` with
`load_model_and_processor` and compares every parameter with the live one.

    python -m scripts.check_zero3_save [--workdir /tmp/zero3-check] [--steps 6]

Needs CUDA and deepspeed (accelerate's DeepSpeed path assumes a GPU); prints one line per saved
folder and exits 1 if any parameter differs or is missing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("recipes/tiny/stage2_lora.yaml", "recipes/tiny/stage2_instruct.yaml")


def _overrides(work: Path, recipe: str, steps: int) -> list[str]:
    return [
        f"vision_tower={work / 'tiny' / 'clip-vision'}",
        f"model_name_or_path={work / 'tiny' / 'llama'}",
        f"data_path={work / 'data' / 'stage2_train.json'}",
        f"image_folder={work / 'data'}",
        "init_from=null",
        f"output_dir={work / Path(recipe).stem}",
        f"max_steps={steps}",
        f"save_steps={max(1, steps // 2)}",
        "logging_steps=1",
        "report_to=none",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=1",
        "dataloader_num_workers=0",
        "deepspeed=recipes/deepspeed/zero3.json",
        "bf16=false",
    ]


def _train_and_dump(recipe: str, work: Path, steps: int) -> None:
    """Runs inside `accelerate launch`: train, then save the gathered live parameters."""
    import deepspeed

    import mllm.training.stages as stages
    from mllm.config import build_run_config

    seen = {}
    train_of_trainer = stages.MllmTrainer.train

    def keep_trainer(self, *args, **kwargs):
        seen["trainer"] = self
        return train_of_trainer(self, *args, **kwargs)

    stages.MllmTrainer.train = keep_trainer  # the trainer that `stages.train` builds, to reach its model
    result = stages.train(build_run_config(recipe, _overrides(work, recipe, steps)))
    model = seen["trainer"].model_wrapped
    model = getattr(model, "module", model)
    params = list(model.named_parameters())
    placeholders = sum(p.numel() == 0 for _, p in params)
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        live = {name: p.detach().float().cpu().clone() for name, p in params}
    torch.save(live, work / f"{Path(recipe).stem}.live.pt")
    print(
        f"trained {recipe}: {result.global_step} steps, loss {result.train_loss:.4f}, "
        f"{len(params)} parameters, {placeholders} of them ZeRO-3 placeholders before the gather"
    )


def _compare(recipe: str, work: Path, steps: int) -> bool:
    from mllm.models.loading import load_model_and_processor

    live = torch.load(work / f"{Path(recipe).stem}.live.pt")
    out = work / Path(recipe).stem
    ok = True
    for folder in (out, out / f"checkpoint-{steps}"):
        model, _ = load_model_and_processor(folder)
        loaded = dict(model.named_parameters())
        missing = sorted(set(live) - set(loaded))
        differ = [
            n
            for n, p in loaded.items()
            if n not in live or p.shape != live[n].shape or not torch.equal(p.detach().float(), live[n])
        ]
        ok = ok and not missing and not differ
        print(
            f"{folder}: {len(loaded) - len(differ)} of {len(live)} parameters equal to the live ones"
            + (f"; differ: {differ[:3]}" if differ else "")
            + (f"; missing: {missing[:3]}" if missing else "")
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/zero3-check"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)  # the launched child's mode
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    if args.train:
        _train_and_dump(args.train, work, args.steps)
        return 0
    if not torch.cuda.is_available():
        print("check_zero3_save: needs a CUDA GPU (accelerate's DeepSpeed path assumes one)", file=sys.stderr)
        return 2
    from data_tools.synth import generate_dataset
    from scripts.build_tiny_components import build_tiny_components

    build_tiny_components(work / "tiny")
    generate_dataset(work / "data", num_scenes=60, seed=0)
    ok = True
    for recipe in RECIPES:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        launch += ["recipes/accelerate/zero3.yaml", "--num_processes", "1", "-m", "scripts.check_zero3_save"]
        launch += ["--train", recipe, "--workdir", str(work), "--steps", str(args.steps)]
        path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
        subprocess.run(launch, cwd=REPO, env={**os.environ, "PYTHONPATH": path}, check=True)
        ok = _compare(recipe, work, args.steps) and ok
    print("ZeRO-3 saves hold the trained weights" if ok else "ZeRO-3 saves DIFFER from the trained weights")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
