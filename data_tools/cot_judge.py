"""Judge records: teach a CoT model the pairwise judgement its own stage-level beam search asks of it.

    python -m data_tools.cot_judge --data runs/data [--fraction 0.5] [--seed 0]

LLaVA-CoT's search asks the model which of two candidates of a stage is better (`StageBeamSearch`'s
judge prompt: the image, the stage's instruction, the question, the hint, "Response 1: ...",
"Response 2: ...", the output format). A large instruct model answers that out of the box; a small
model trained only on staged answers does not (every verdict falls back to log-probability). For a
``fraction`` of the records of ``cot_train.json`` this writes one judge record: a random stage, the
record's own text of that stage against the same stage of another record (a wrong caption, reasoning
or conclusion for this image), in random order, with the hint the search shows (the record's own
earlier stages), answered ``Since response K is right about the image, I choose response K.``

Writes ``cot_judge_train.json`` and ``cot_train_with_judge.json`` (the CoT records and the judge
records, shuffled), which `recipes/tiny/stage2_cot.yaml` trains on. The prompts are built by
`mllm.inference.stage_beam.judge_prompt`, so training shows exactly what the search asks.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllm.data.formats import save_json
from mllm.inference.stage_beam import DEFAULT_STAGES, judge_prompt, stage_text

__all__ = ["judge_records", "main"]


def _stages(answer: str) -> dict[str, str]:
    return {stage.name: stage_text(answer, stage) for stage in DEFAULT_STAGES}


def judge_records(
    records: list[dict[str, Any]], fraction: float = 0.5, seed: int = 0
) -> list[dict[str, Any]]:
    """One judge record for each of ``fraction`` of the staged ``records`` (LLaVA conversations)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
    rng = random.Random(seed)
    parsed = [(r, _stages(r["conversations"][-1]["value"])) for r in records]
    parsed = [(r, st) for r, st in parsed if all(st.values())]
    if len(parsed) < 2:
        raise ValueError("judge records need at least two staged records with all four stages.")
    out = []
    for record, own in rng.sample(parsed, round(fraction * len(parsed))):
        stage = rng.choice(DEFAULT_STAGES)
        other = own[stage.name]
        for _ in range(20):  # another record's text of this stage that differs from this one's
            other = rng.choice(parsed)[1][stage.name]
            if other != own[stage.name]:
                break
        if other == own[stage.name]:
            continue
        right = rng.randint(1, 2)
        texts = [own[stage.name], other] if right == 1 else [other, own[stage.name]]
        question = record["conversations"][-2]["value"].replace("<image>", "").strip()
        hint = " ".join(own[name] for name in stage.hint_from).strip()
        prompt = judge_prompt(stage.judge, stage.recall, question, hint, texts)
        out.append(
            {
                "id": f"{record['id']}-judge-{stage.name.lower()}",
                "image": record["image"],
                "conversations": [
                    {"from": "human", "value": f"<image>\n{prompt}"},
                    {
                        "from": "gpt",
                        "value": f"Since response {right} is right about the image, I choose response {right}.",
                    },
                ],
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a data_tools.synth output folder")
    parser.add_argument("--fraction", type=float, default=0.5, help="judge records per CoT record")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source = args.data / "cot_train.json"
    if not source.is_file():
        raise SystemExit(f"{source} not found: run `python -m data_tools.synth --output {args.data}` first.")
    records = json.loads(source.read_text(encoding="utf-8"))
    judges = judge_records(records, args.fraction, args.seed)
    merged = records + judges
    random.Random(args.seed).shuffle(merged)
    save_json(judges, args.data / "cot_judge_train.json", indent=1)
    save_json(merged, args.data / "cot_train_with_judge.json", indent=1)
    print(f"{len(judges)} judge records -> {args.data / 'cot_judge_train.json'}; "
          f"{len(merged)} records -> {args.data / 'cot_train_with_judge.json'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
