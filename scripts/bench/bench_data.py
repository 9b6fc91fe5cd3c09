"""Benchmark: read + tokenise + mask 10,000 synthetic stage-2 records, mllm vs a LLaVA-style reference.

    python -m scripts.bench.bench_data [--records 10000] [--scenes 300]

Both run in this process on the same tiny tokenizer (scripts/build_tiny_components.py) and the
same LLaVA json written by data_tools.synth (records repeated with fresh ids up to ``--records``).

* mllm: ``load_records`` + ``SupervisedDataset`` (template ``vicuna_v1``): render each record once,
  tokenise all of them in batched calls, mask by character offsets.
* reference: the approach of LLaVA's ``preprocess_v1`` (https://github.com/haotian-liu/LLaVA,
  ``llava/train/train.py``), re-implemented here: render, tokenise the whole conversation, then
  split it into rounds and tokenise each round and its instruction again to find how many tokens
  to mask, record by record. It also counts the records whose piecewise lengths disagree with the
  full tokenisation (LLaVA's "tokenization mismatch"; such records are fully masked there).

Prints records/s for each, the ratio, and a markdown table row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mllm.data.dataset import SupervisedDataset
from mllm.data.formats import load_records
from mllm.data.templates import IGNORE_INDEX, VICUNA_SYSTEM
from mllm.models.processing_mllm import MllmProcessor

__all__ = ["main", "reference_preprocess_v1"]


def _tokenize_with_images(text: str, tokenizer, image_token_id: int) -> list[int]:
    """Tokenise text chunks between ``<image>`` and put one image id between them (LLaVA's
    ``tokenizer_image_token`` idea)."""
    ids: list[int] = []
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            ids.append(image_token_id)
        ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return ids


def reference_preprocess_v1(
    conversations: list[dict], tokenizer, image_token_id: int
) -> tuple[list, list, bool]:
    """One record the ``preprocess_v1`` way; returns (input_ids, labels, mismatch)."""
    eos = tokenizer.eos_token
    bos = tokenizer.bos_token or ""
    text = bos + VICUNA_SYSTEM + " "
    for turn in conversations:
        if turn["from"] == "human":
            text += "USER: " + turn["value"] + " ASSISTANT: "
        else:
            text += turn["value"] + eos
    input_ids = _tokenize_with_images(text, tokenizer, image_token_id)
    labels = list(input_ids)
    cursor = 0
    for rou in text.split(eos):
        if not rou:
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        rou_len = len(_tokenize_with_images(rou + eos, tokenizer, image_token_id))
        instruction_len = len(_tokenize_with_images(parts[0] + " ASSISTANT: ", tokenizer, image_token_id))
        labels[cursor : cursor + instruction_len] = [IGNORE_INDEX] * instruction_len
        cursor += rou_len
    labels[cursor:] = [IGNORE_INDEX] * (len(labels) - cursor)
    mismatch = cursor != len(input_ids)
    if mismatch:
        labels = [IGNORE_INDEX] * len(labels)
    return input_ids, labels, mismatch


def _write_records(out: Path, scenes: int, n: int) -> Path:
    from data_tools.synth import generate_dataset

    generate_dataset(out / "synth", num_scenes=scenes, seed=0)
    base = json.loads((out / "synth" / "stage2_train.json").read_text())
    rows = []
    for k in range(n):
        row = dict(base[k % len(base)])
        row["id"] = f"r{k:06d}"
        rows.append(row)
    path = out / "synth" / "bench.json"
    path.write_text(json.dumps(rows))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=10_000, help="records to read and tokenise")
    parser.add_argument("--scenes", type=int, default=300, help="synthetic scenes (records repeat over them)")
    args = parser.parse_args(argv)

    from scripts.build_tiny_components import build_tiny_components

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        components = build_tiny_components(tmp_path / "tiny")
        processor = MllmProcessor.from_components(
            str(components["clip-vision"]), str(components["llama"]), num_image_tokens=16
        )
        data = _write_records(tmp_path, args.scenes, args.records)

        start = time.perf_counter()
        records, _ = load_records(data)
        dataset = SupervisedDataset(records, processor, "vicuna_v1", None)
        ours = time.perf_counter() - start
        assert len(dataset) == args.records

        start = time.perf_counter()
        raw = json.loads(data.read_text())
        mismatches = 0
        for row in raw:
            *_, bad = reference_preprocess_v1(
                row["conversations"], processor.tokenizer, processor.image_token_id
            )
            mismatches += bad
        reference = time.perf_counter() - start

    n = args.records
    print(f"mllm (load_records + SupervisedDataset): {n / ours:,.0f} records/s ({ours:.2f} s)")
    print(
        f"reference (preprocess_v1-style re-tokenisation): {n / reference:,.0f} records/s ({reference:.2f} s), "
        f"{mismatches} records with a tokenisation mismatch"
    )
    print(f"speed-up: {reference / ours:.2f}x")
    print("| benchmark | records | mllm rec/s | reference rec/s | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| read+tokenise+mask stage-2 | {n} | {n / ours:,.0f} | {n / reference:,.0f} | {reference / ours:.2f}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
