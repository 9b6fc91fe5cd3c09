"""Benchmark: stage-2 training throughput, transformers' LLaVA + Trainer (padded batches) vs mllm
(packing).

    python -m scripts.bench.train_throughput [--scenes 64] [--epochs 1] [--threads 1]

Both run in this process on the same records, tokens (mllm's `SupervisedDataset` renders and masks
them once for both), seed and tiny-but-not-trivial components (scripts/build_tiny_components.py with
a 4-block, 128-wide LLM), tower frozen, connector and LLM trained, AdamW, same learning rate.
The data are data_tools.synth's stage-2 instructions with realistic length variance: about a third
of the answers become long descriptions (tens to a few hundred tokens), as in LLaVA-665K where
short VQA answers and long detailed descriptions mix.

* reference: the choice a user has today: `transformers.LlavaForConditionalGeneration` (the same
  widths, randomly initialised) trained by `transformers.Trainer` with padded batches of
  ``--batch-size`` in random order;
* mllm: `mllm.training.stages.train` with ``packing: true`` (rows of whole samples up to
  ``--packing-max-length`` tokens, first-fit decreasing; ``group_by_modality_length`` is set but
  has nothing to group on packed rows, which first-fit decreasing already fills to the budget).

Row length matters on sdpa / eager: a packed row's block-diagonal mask is applied, not skipped, so
attention still costs (row length)^2; rows about as long as the longest sample (the default 384
here, longest 331) win, rows of 1024 lost on CPU (0.80x, one run). flash-attention varlen, which
skips the masked blocks, would not pay that.

Prints samples/s, tokens/s (text and image tokens together) and the process's peak RSS so far, one
line each, then the ratio. One CPU thread by default; each side runs ``--repeats`` times,
alternating, and its best run is kept.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _long_answers(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    records = json.loads(path.read_text())
    parts = ["a red circle at the top left", "a blue square in the middle", "a green triangle at the bottom"]
    for r in records:
        if rng.random() < 0.35:
            text = ", ".join(rng.choice(parts) for _ in range(rng.randint(4, 40)))
            r["conversations"][-1]["value"] = f"The image shows {text}."
    path.write_text(json.dumps(records))


def _reference(components, dataset, processor, args, out: Path) -> tuple[float, float]:
    """transformers' LLaVA + Trainer on padded batches: (samples/s, tokens/s)."""
    from transformers import (
        AutoConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Trainer,
        TrainingArguments,
    )

    from mllm.data.collator import MllmCollator
    from mllm.models.vision import vision_config_from

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=vision_config_from(str(components["clip-vision"])),
        text_config=AutoConfig.from_pretrained(str(components["llama"])),
        image_token_index=processor.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=processor.num_image_tokens,
    )
    model = LlavaForConditionalGeneration(config)
    model.resize_token_embeddings(len(processor.tokenizer))
    model.model.vision_tower.requires_grad_(False)
    pad = MllmCollator(processor.tokenizer.pad_token_id)

    def collate(samples):
        batch = pad(samples)
        batch.pop("skipped")
        return batch

    training = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=1e-3,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10_000,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - start
    return args.epochs * len(dataset) / runtime, args.epochs * sum(dataset.lengths) / runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=64, help="synthetic scenes (~2.3 stage-2 records each)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="padded batch (reference)")
    parser.add_argument("--packing-max-length", type=int, default=384, help="tokens per packed row (mllm)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from data_tools.synth import generate_dataset
    from mllm.config import build_run_config
    from mllm.data.dataset import build_dataset
    from mllm.models.configuration_mllm import MllmConfig
    from mllm.models.processing_mllm import MllmProcessor
    from mllm.training.stages import train
    from scripts.build_tiny_components import TinySizes, build_tiny_components

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    components = build_tiny_components(work / "tiny", TinySizes(llm_hidden=128, llm_layers=4))
    data = work / "data"
    generate_dataset(data, num_scenes=args.scenes, seed=0, image_size=48)
    _long_answers(data / "stage2_train.json", seed=0)
    vision, llm = str(components["clip-vision"]), str(components["llama"])

    def mllm_run():
        return build_run_config(
            None,
            [
                f"vision_tower={vision}",
                f"model_name_or_path={llm}",
                f"data_path={data / 'stage2_train.json'}",
                f"image_folder={data}",
                f"output_dir={work / 'mllm'}",
                "tune_llm=full",
                "packing=true",
                f"packing_max_length={args.packing_max_length}",
                f"model_max_length={args.packing_max_length}",
                "group_by_modality_length=true",
                "per_device_train_batch_size=1",
                f"num_train_epochs={args.epochs}",
                "learning_rate=1e-3",
                "use_cpu=true",
                "save_strategy=no",
                "report_to=none",
                "disable_tqdm=true",
                "logging_steps=10000",
                "seed=0",
            ],
        )

    run = mllm_run()
    first = train(run)  # also tells the image-token count the reference must use
    config = MllmConfig.from_pretrained(work / "mllm")
    processor = MllmProcessor.from_components(vision, llm, num_image_tokens=config.num_image_tokens)
    dataset = build_dataset(data / "stage2_train.json", data, processor, None, args.packing_max_length)
    lengths = sorted(dataset.lengths)
    print(
        f"# {len(dataset)} samples, tokens per sample: median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}, min {lengths[0]}; {sum(dataset.modality)} with an image"
    )
    best_ref: tuple[float, float] = (0.0, 0.0)
    best_ours = first
    for k in range(args.repeats):
        ref = _reference(components, dataset, processor, args, work / "reference")
        best_ref = max(best_ref, ref)
        if k:  # the first mllm run happened above
            ours = train(mllm_run())
            if ours.samples_per_second > best_ours.samples_per_second:
                best_ours = ours
    ours_tokens = best_ours.tokens_per_second + best_ours.image_tokens_per_second
    print(f"reference (LLaVA + Trainer, padded)  {best_ref[0]:7.1f} samples/s {best_ref[1]:8.0f} tokens/s")
    print(
        f"mllm (packing, FFD rows)             {best_ours.samples_per_second:7.1f} samples/s {ours_tokens:8.0f} tokens/s"
    )
    print(f"peak RSS of the process: {_peak_rss_mb():.0f} MB")
    print(
        f"ratio mllm/reference: {best_ours.samples_per_second / best_ref[0]:.2f}x samples/s "
        f"(threads={args.threads}, batch {args.batch_size} vs rows of {args.packing_max_length} tokens)"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
