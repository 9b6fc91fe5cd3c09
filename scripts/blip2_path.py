"""The BLIP-2 path on the embedded default, end to end, offline, on a CPU; beside it the same Q-Former
trained only through the LLM (randomly initialised), on the same data and budget.

    python -m scripts.blip2_path [--workdir runs/blip2-path] [--num-scenes 3000] [--retrieval-only]

1. the main job's world (scripts.quickstart.prepare_world): synthetic data, tiny components, the
   vision tower and the LLM pre-trained;
2. BLIP-2 stage 1 (recipes/blip2/stage1_qformer.yaml): the Q-Former alone with ITC + ITM + ITG on the
   training captions, vision frozen, no LLM; then `mllm eval --task retrieval` on the test split with
   captions made unique per image (an image whose caption another test image shares is left out, so a
   hit is never ambiguous): text->image and image->text Recall@1/5/10 beside chance;
3. BLIP-2 stage 2 (recipes/blip2/stage2_generative.yaml): stage 1's Q-Former + a fresh projection into
   the frozen LLM, language-modelling loss on the captions;
4. instruction tuning (recipes/tiny/stage2_lora.yaml, connector + LoRA) from stage 2;
5. the baseline: the LLaVA path with the same Q-Former shape randomly initialised -- stage 1
   (recipes/tiny/stage1_align.yaml, connector only) then the same instruction tuning;
6. exact match of both on the held-out test questions.

The Q-Former has the same shape in both arms (2 layers of the vision tower's width, each with a
cross-attention, --queries queries, 32 by default, learned vision positions), so only the
initialisation differs. 3000 scenes by
default, to stay within 15 minutes on 2 cores; on that budget even the MLP connector reaches only 59%
on the test questions (one run), so ``--num-scenes 6000 --stage1-epochs 6`` (the main job's world,
where the MLP reaches 96%; about 17 minutes) is the fair comparison of connectors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLIP2 = REPO / "recipes" / "blip2"
TINY = REPO / "recipes" / "tiny"
QUERIES = 32  # default --queries (BLIP-2: 32)
# the Q-Former's size keys, the same for BLIP-2 stage 1 and the randomly initialised connector
SHAPE = [
    "qformer_num_layers=2",
    "qformer_num_heads=null",
    "qformer_hidden_size=null",
    "qformer_cross_attention_freq=1",
    "qformer_vision_positions=true",  # the tiny tower's features carry little position (see the README)
]


def architecture(queries: int) -> list[str]:
    """The keys that fix the connector, the same in both arms."""
    return [
        "connector_type=qformer",
        f"num_query_tokens={queries}",
        "vision_feature_layer=-2",
        "vision_feature_select_strategy=full",
    ]


def unique_caption_rows(records: list[dict]) -> list[dict]:
    """Retrieval rows (id, image, captions) of the caption records whose caption no other record has."""
    caption = {r["id"]: r["conversations"][-1]["value"].strip() for r in records}
    counts = Counter(caption.values())
    return [
        {"id": r["id"], "image": r["image"], "captions": [caption[r["id"]]]}
        for r in records
        if counts[caption[r["id"]]] == 1
    ]


def _train(recipe: Path, overrides: list[str]):
    from mllm.config import build_run_config
    from mllm.training.stages import train

    return train(build_run_config(recipe, [*overrides, "disable_tqdm=true"]))


def _exact_match(run_dir: Path, data: Path, output: Path) -> dict:
    from mllm.evaluation.runner import evaluate

    return evaluate(
        str(run_dir),
        "vqa",
        str(data / "vqa_test.jsonl"),
        image_folder=str(data),
        output=str(output),
        batch_size=32,
        image_position="after",  # as in data_tools.synth's stage-2 conversations
        overwrite=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/blip2-path"))
    parser.add_argument(
        "--num-scenes", type=int, default=3000, help="synthetic scenes (10%% become the test split)"
    )
    parser.add_argument(
        "--stage1-epochs", type=float, default=12, help="epochs of BLIP-2 stage 1 on the captions"
    )
    parser.add_argument("--contrastive-loss", choices=["infonce", "sigmoid"], default="infonce")
    parser.add_argument("--rerank", type=int, default=0, help="also re-rank the ITC top-K by ITM (0 = off)")
    parser.add_argument(
        "--retrieval-only", action="store_true", help="stop after stage 1's retrieval figures"
    )
    parser.add_argument(
        "--queries", type=int, default=QUERIES, help="Q-Former queries (image tokens per image)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--text-steps", type=int, default=150)
    args = parser.parse_args(argv)

    from mllm.evaluation.retrieval_eval import evaluate_retrieval
    from mllm.io import atomic_write_text
    from scripts.quickstart import prepare_world

    work: Path = args.workdir
    data = work / "data"
    started = time.perf_counter()
    tiny, _ = prepare_world(work, args.num_scenes, args.seed, args.clip_steps, args.text_steps)
    components = [f"vision_tower={tiny['clip-vision']}", f"model_name_or_path={tiny['llama']}"]
    common = [*components, f"image_folder={data}", f"seed={args.seed}", "save_strategy=no"]
    captions = f"data_path={data / 'stage1_train.json'}"
    instruct = f"data_path={data / 'stage2_train.json'}"
    times: dict[str, float] = {}

    print("[BLIP-2 1/3] stage 1: the Q-Former alone, ITC + ITM + ITG on the captions")
    t = time.perf_counter()
    stage1 = work / "blip2-stage1"
    s1 = _train(
        BLIP2 / "stage1_qformer.yaml",
        [
            *common,
            captions,
            *SHAPE,
            f"num_query_tokens={args.queries}",
            f"output_dir={stage1}",
            f"num_train_epochs={args.stage1_epochs}",
            f"contrastive_loss={args.contrastive_loss}",
        ],
    )
    times["BLIP-2 stage 1 (Q-Former, ITC+ITM+ITG)"] = time.perf_counter() - t
    rows = unique_caption_rows(json.loads((data / "stage1_test.json").read_text(encoding="utf-8")))
    rows_file = work / "retrieval_test.json"
    atomic_write_text(rows_file, json.dumps(rows))
    retrieval = evaluate_retrieval(
        stage1, str(rows_file), work / "eval-retrieval", image_folder=str(data), rerank=args.rerank
    )
    print(
        f"stage 1: {s1.global_step} steps, final loss {s1.train_loss:.3f}; {retrieval['num_images']} held-out images, unique captions"
    )
    print(f"{'':14s} {'text->image':>12s} {'image->text':>12s} {'chance':>8s}")
    for k in (1, 5, 10):
        print(
            f"Recall@{k:<7d} {retrieval[f't2i_r@{k}']:11.1f}% {retrieval[f'i2t_r@{k}']:11.1f}% {retrieval[f'chance_t2i_r@{k}']:7.1f}%"
        )
    ratio = retrieval["t2i_r@5"] / retrieval["chance_t2i_r@5"]
    print(f"text->image R@5 = {ratio:.1f}x chance")
    if args.retrieval_only:
        return 0

    def stage(label: str, note: str, recipe: Path, out: Path, *more: str) -> Path:
        print(note)
        t = time.perf_counter()
        _train(recipe, [*common, *more, f"output_dir={out}"])
        times[label] = time.perf_counter() - t
        return out

    arch = architecture(args.queries)
    stage2 = stage(
        "BLIP-2 stage 2 (generative)",
        "[BLIP-2 2/3] stage 2: stage 1's Q-Former + a projection into the frozen LLM, on the captions",
        BLIP2 / "stage2_generative.yaml", work / "blip2-stage2", captions, f"init_from={stage1}", "num_train_epochs=2",
    )  # fmt: skip
    blip2 = stage(
        "BLIP-2 instruction tuning", "[BLIP-2 3/3] instruction tuning from stage 2 (connector + LoRA)",
        TINY / "stage2_lora.yaml", work / "blip2-instruct", *arch, instruct, f"init_from={stage2}",
    )  # fmt: skip
    base1 = stage(
        "baseline stage 1 (random Q-Former)",
        "[baseline 1/2] LLaVA stage 1 with a randomly initialised Q-Former (connector only)",
        TINY / "stage1_align.yaml", work / "random-qformer-stage1", *arch, *SHAPE, captions,
    )  # fmt: skip
    base2 = stage(
        "baseline instruction tuning", "[baseline 2/2] the same instruction tuning",
        TINY / "stage2_lora.yaml", work / "random-qformer-instruct", *arch, instruct, f"init_from={base1}",
    )  # fmt: skip

    t = time.perf_counter()
    ours = _exact_match(blip2, data, work / "eval-blip2")
    theirs = _exact_match(base2, data, work / "eval-random-qformer")
    times["evaluation (both)"] = time.perf_counter() - t
    print()
    for name, seconds in times.items():
        print(f"{name:40s} {seconds:7.1f}s")
    print()
    print(
        f"text->image R@5 {retrieval['t2i_r@5']:.1f}% vs chance {retrieval['chance_t2i_r@5']:.1f}% ({ratio:.1f}x)"
    )
    print(f"test exact match, BLIP-2 path (stage 1 -> 2 -> instruction): {100 * ours['exact_match']:.1f}%")
    print(f"test exact match, random Q-Former through the LLM only:      {100 * theirs['exact_match']:.1f}%")
    print(f"question-type prior: {100 * ours['question_type_prior']:.1f}%; {ours['num_samples']} questions")
    print(f"total time: {time.perf_counter() - started:.0f}s")
    summary = {
        "retrieval": retrieval,
        "blip2_exact_match": ours["exact_match"],
        "random_qformer_exact_match": theirs["exact_match"],
        "seconds": times,
    }
    atomic_write_text(work / "blip2_path.json", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
