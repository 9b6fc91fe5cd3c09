"""The main job: the embedded default, end to end, offline, on a CPU.

    python -m scripts.quickstart [--workdir runs] [--num-scenes 6000]

synthetic shapes data -> tiny components (the vision tower pre-trained with a CLIP loss on the
training captions and a region-phrase loss on each object's patch) -> the tiny LLM learns the corpus
text (the image placeholders removed) -> the frozen tower's features of the training images, cached
once (``vision_feature_cache``) -> stage 1 (connector only, LLM frozen) -> stage 2 (connector +
LoRA), both reading the cache -> exact-match accuracy on the held-out test split, the same model with blank images (proof
that the image flows through the connector), and one example.
Each step is one call; the recipes in recipes/tiny/ hold the hyper-parameters.

The blank-image check: blind, the model can know no more than the question gives away, so its
blank-image accuracy must stay within BLANK_IMAGE_MARGIN of the question-type prior (each type's
most common answer, the VQA paper's per-Q-type prior). The job prints both baselines and a PASS or
FAIL line, and exits 1 when the check fails (after printing everything).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from data_tools.synth import generate_dataset
from scripts.build_tiny_components import TinySizes, build_tiny_components
from scripts.pretrain_clip import pretrain_clip
from scripts.pretrain_text_llm import pretrain_text_llm

__all__ = ["MAIN_JOB_SIZES", "Row", "main", "prepare_world"]

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
# Wider than the test components: the main job has to learn the shapes world, not only run.
MAIN_JOB_SIZES = TinySizes(vision_hidden=64, llm_hidden=128, llm_layers=4)
BLANK_IMAGE_MARGIN = 0.05  # blank-image exact match may exceed the question-type prior by 5 points at most


@dataclass
class Row:
    stage: str
    steps: int
    seconds: float
    loss: float | None = None
    accuracy: float | None = None


def _table(rows: list[Row]) -> str:
    lines = [f"{'stage':28s} {'steps':>6s} {'time':>8s} {'loss':>8s} {'accuracy':>9s}"]
    for r in rows:
        loss = f"{r.loss:.3f}" if r.loss is not None else "-"
        acc = f"{100 * r.accuracy:.1f}%" if r.accuracy is not None else "-"
        lines.append(f"{r.stage:28s} {r.steps:6d} {r.seconds:7.1f}s {loss:>8s} {acc:>9s}")
    return "\n".join(lines)


def _by_type(metrics: dict) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in metrics["exact_match_by_type"].items())


def _recipe_value(recipe: str, key: str) -> object:
    from mllm.config import load_recipe

    return load_recipe(RECIPES / recipe)[key]


def _train_stage(recipe: Path, overrides: list[str]):
    from mllm.config import build_run_config
    from mllm.training.stages import train

    return train(build_run_config(recipe, overrides))


def prepare_world(
    work: Path, num_scenes: int, seed: int, clip_steps: int, text_steps: int
) -> tuple[dict[str, Path], list[Row]]:
    """Steps 1-3 of the main job: the synthetic data in ``work/data``, the tiny components in
    ``work/tiny`` with the vision tower and the LLM pre-trained; returns the components and the rows
    of the timing table. (scripts.blip2_path starts from the same world.)"""
    rows: list[Row] = []
    print(f"[1/6] synthetic data -> {work / 'data'}")
    t = time.perf_counter()
    counts = generate_dataset(work / "data", num_scenes=num_scenes, seed=seed)
    rows.append(Row("synthetic data", 0, time.perf_counter() - t))
    print("      " + ", ".join(f"{k}: {v}" for k, v in counts.items()))

    print(f"[2/6] tiny components -> {work / 'tiny'}")
    t = time.perf_counter()
    tiny = build_tiny_components(work / "tiny", MAIN_JOB_SIZES, seed=seed)
    rows.append(Row("tiny components", 0, time.perf_counter() - t))
    t = time.perf_counter()
    clip = pretrain_clip(
        tiny["clip-vision"],
        tiny["llama"],
        work / "data" / "stage1_train.json",
        work / "data",
        tiny["clip-vision"],
        steps=clip_steps,
        seed=seed,
        # each training object's patch token, at the layer the connector reads, is aligned with its phrase
        regions=work / "data" / "scenes.jsonl",
        feature_layer=int(_recipe_value("stage2_lora.yaml", "vision_feature_layer")),
    )
    rows.append(Row("vision tower: CLIP + region", clip_steps, time.perf_counter() - t, clip["final_loss"]))

    print("[3/6] the tiny LLM learns the text of the synthetic corpus (no images)")
    t = time.perf_counter()
    text = pretrain_text_llm(
        tiny["llama"],
        [work / "data" / "stage1_train.json", work / "data" / "stage2_train.json"],
        tiny["llama"],
        max_steps=text_steps,
        seed=seed,
    )
    rows.append(Row("LLM text pretraining", int(text["steps"]), time.perf_counter() - t, text["train_loss"]))

    return tiny, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("runs"), help="where data, components and runs go"
    )
    parser.add_argument(
        "--num-scenes", type=int, default=6000, help="synthetic scenes (train/val/test split)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data, the components and their pre-training (the stage recipes keep their own)",
    )
    parser.add_argument("--text-steps", type=int, default=150, help="steps of LLM text pretraining")
    parser.add_argument("--clip-steps", type=int, default=600, help="steps of contrastive vision pretraining")
    args = parser.parse_args(argv)
    work: Path = args.workdir
    started = time.perf_counter()

    tiny, rows = prepare_world(work, args.num_scenes, args.seed, args.clip_steps, args.text_steps)

    paths = [f"vision_tower={tiny['clip-vision']}", f"model_name_or_path={tiny['llama']}"]
    # the tower is frozen in both stages: its features are computed once, and neither stage runs it
    data = [f"image_folder={work / 'data'}", f"vision_feature_cache={work / 'tiny-features'}"]
    stage1_dir, stage2_dir = work / "tiny-stage1", work / "tiny-stage2-lora"
    stage1 = [*paths, *data, f"data_path={work / 'data' / 'stage1_train.json'}", f"output_dir={stage1_dir}"]

    print("[4/6] stage 1: align the connector on captions (vision and LLM frozen)")
    t = time.perf_counter()
    from mllm.config import build_run_config
    from mllm.training.cache_features import cache_features

    cache = cache_features(
        build_run_config(RECIPES / "stage1_align.yaml", stage1), log=lambda m: print(f"      {m}")
    )
    rows.append(Row(f"feature cache ({len(cache)} images)", 0, time.perf_counter() - t))
    t = time.perf_counter()
    s1 = _train_stage(RECIPES / "stage1_align.yaml", stage1)
    rows.append(Row("stage 1 (connector)", s1.global_step, time.perf_counter() - t, s1.train_loss))

    print("[5/6] stage 2: visual instruction tuning (connector + LoRA on the LLM)")
    t = time.perf_counter()
    s2 = _train_stage(
        RECIPES / "stage2_lora.yaml",
        [
            *paths,
            *data,
            f"data_path={work / 'data' / 'stage2_train.json'}",
            f"init_from={stage1_dir}",
            f"output_dir={stage2_dir}",
        ],
    )
    rows.append(Row("stage 2 (connector + LoRA)", s2.global_step, time.perf_counter() - t, s2.train_loss))

    print("[6/6] evaluation on the held-out test split (and again with blank images)")
    from mllm.evaluation.runner import evaluate_model
    from mllm.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(stage2_dir)
    common = dict(
        task="vqa",
        data=str(work / "data" / "vqa_test.jsonl"),
        image_folder=str(work / "data"),
        batch_size=32,
        image_position="after",  # as in data_tools.synth's stage-2 conversations
    )
    t = time.perf_counter()
    metrics = evaluate_model(model, processor, output=work / "eval-test", **common)
    rows.append(Row("eval: test split", 0, time.perf_counter() - t, None, metrics["exact_match"]))
    t = time.perf_counter()
    blank = evaluate_model(model, processor, output=work / "eval-test-blank", blank_images=True, **common)
    rows.append(Row("eval: blank images", 0, time.perf_counter() - t, None, blank["exact_match"]))

    example = json.loads(
        (work / "eval-test" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()[0]
    )
    print()
    print(_table(rows))
    print()
    print(
        f"test exact match:            {100 * metrics['exact_match']:.1f}% ({metrics['num_samples']} questions)"
    )
    print(f"same model, blank images:    {100 * blank['exact_match']:.1f}%")
    print(f"majority-answer baseline:    {100 * metrics['majority_baseline']:.1f}%")
    print(
        f"question-type prior:         {100 * metrics['question_type_prior']:.1f}% (each type's most common answer)"
    )
    print(f"by question type:            {_by_type(metrics)}")
    print(f"  blank images, by type:     {_by_type(blank)}")
    print(
        f"example: {example['question']!r} -> {example['prediction']!r} (expected {example['answers'][0]!r})"
    )
    print(f"total time: {time.perf_counter() - started:.0f}s; model: {stage2_dir}")
    passed = _blank_image_check(blank["exact_match"], metrics["question_type_prior"])
    return 0 if passed else 1


def _blank_image_check(blank: float, prior: float, margin: float = BLANK_IMAGE_MARGIN) -> bool:
    """Print and return whether blank-image accuracy <= question-type prior + ``margin``."""
    bound = prior + margin
    passed = blank <= bound
    figures = (
        f"blank-image exact match {100 * blank:.1f}% {'<=' if passed else '>'} question-type prior "
        f"{100 * prior:.1f}% + {100 * margin:.0f} points = {100 * bound:.1f}%"
    )
    if passed:
        print(f"PASS: {figures}")
    else:
        print(f"FAIL: {figures}: blind, the model knows more than the question gives away")
    return passed


if __name__ == "__main__":
    raise SystemExit(main())
