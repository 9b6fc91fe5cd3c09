"""Multiple-choice and POPE-style yes/no evaluation sets from the synthetic test scenes.

    python -m data_tools.eval_sets --data runs/data [--split test] [--seed 0]

Reads ``scenes.jsonl`` (written by `data_tools.synth`) and writes, for the scenes of ``--split``:

- ``mcq_{split}.jsonl``: per scene, the colour of one shape and the shape of one colour, each with
  four options (the right one and three others, shuffled) and the answer's letter -- rows for
  ``mllm eval --task mcq``;
- ``pope_{split}.jsonl``: per scene, POPE's random setting: one object that is there and one that
  is not (a colour-shape pair absent from the scene), asked in the synthetic questions' wording
  ("Is there a red circle?"), ``label`` yes / no -- rows for ``mllm eval --task yesno``.

The question texts are the training data's, so a model trained on `data_tools.synth` knows them; only
the options (mcq) are new to it. Nothing here changes what `data_tools.synth` writes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.synth import COLORS, SHAPES
from mllm.data.formats import save_jsonl

__all__ = ["mcq_rows", "pope_rows", "write_eval_sets"]

LETTERS = "ABCD"


def _scenes(data: Path, split: str) -> list[dict[str, Any]]:
    path = data / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m data_tools.synth --output {data}` first.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def _choice(rng: random.Random, right: str, pool: Sequence[str], n: int = 4) -> tuple[list[str], str]:
    """``n`` options (``right`` and ``n - 1`` others from ``pool``, shuffled) and ``right``'s letter."""
    options = [right, *rng.sample([p for p in pool if p != right], min(n - 1, len(pool) - 1))]
    rng.shuffle(options)
    return options, LETTERS[options.index(right)]


def mcq_rows(scenes: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for scene in scenes:
        rng = random.Random(f"mcq:{seed}:{scene['scene_id']}")
        shape = rng.choice(scene["shapes"])
        options, answer = _choice(rng, shape["color"], sorted(COLORS))
        rows.append(
            {
                "question_id": f"{scene['scene_id']}-color",
                "image": scene["image"],
                "question": f"What color is the {shape['shape']}?",
                "options": options,
                "answer": answer,
            }
        )
        options, answer = _choice(rng, shape["shape"], SHAPES, n=3)
        rows.append(
            {
                "question_id": f"{scene['scene_id']}-shape",
                "image": scene["image"],
                "question": f"What shape is the {shape['color']} object?",
                "options": options,
                "answer": answer,
            }
        )
    return rows


def pope_rows(scenes: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for scene in scenes:
        rng = random.Random(f"pope:{seed}:{scene['scene_id']}")
        present = {(s["color"], s["shape"]) for s in scene["shapes"]}
        there = rng.choice(sorted(present))
        absent = rng.choice([(c, k) for c in sorted(COLORS) for k in SHAPES if (c, k) not in present])
        for (color, kind), label in ((there, "yes"), (absent, "no")):
            rows.append(
                {
                    "question_id": f"{scene['scene_id']}-{label}",
                    "image": scene["image"],
                    "text": f"Is there a {color} {kind}?",
                    "label": label,
                }
            )
    return rows


def write_eval_sets(data: Path, split: str = "test", seed: int = 0) -> dict[str, int]:
    """Write ``mcq_{split}.jsonl`` and ``pope_{split}.jsonl`` into ``data``; returns their row counts."""
    scenes = _scenes(data, split)
    if not scenes:
        raise ValueError(f"{data / 'scenes.jsonl'} has no scene of split `{split}`.")
    mcq, pope = mcq_rows(scenes, seed), pope_rows(scenes, seed)
    save_jsonl(mcq, data / f"mcq_{split}.jsonl")
    save_jsonl(pope, data / f"pope_{split}.jsonl")
    return {f"mcq_{split}.jsonl": len(mcq), f"pope_{split}.jsonl": len(pope)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a data_tools.synth output folder")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, n in write_eval_sets(args.data, args.split, args.seed).items():
        print(f"{args.data / name}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
