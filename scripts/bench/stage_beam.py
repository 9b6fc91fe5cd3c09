"""Benchmark: stage-level beam search, LLaVA-CoT's reference approach vs mllm's, same model and questions.

    python -m scripts.bench.stage_beam --model runs/tiny-cot --data runs/data/cot_test.json \\
        [--questions 4] [--beams 2 4] [--max-stage-tokens 64] [--max-judge-tokens 24]

Both run in this process, for each N, on the same questions with N candidates per stage and N-1
judgements per stage (pairwise knock-out, the same judge prompts, greedy judges, at most
``--max-judge-tokens``; candidates sampled at LLaVA-CoT's temperature 0.6 / top-p 0.9, at most
``--max-stage-tokens`` per stage).

* reference: ``generate_inner_stage_beam`` of PKU-YuanGroup/LLaVA-CoT ``inference/demo/
  simple_inference.py``, re-implemented on this model: one ``model.generate`` per candidate and per
  judgement, each re-processing the image and prefilling the whole accepted prefix, with its
  ``StopOnStrings`` criterion that decodes the whole sequence at every step; random knock-out pairs.
* mllm: `mllm.inference.stage_beam.StageBeamSearch` (image encoded once, prefix cache expanded for
  the candidates, which decode as one batch; judges' prefixes from cache; tail-only tag check).

Prints, one line per N, seconds per question, token positions run through the LLM per question,
vision-tower calls per question and the speed-up. Without ``--model`` a random tiny model is built
(its candidates never close a tag, so every stage runs to the token limit). One CPU thread by
default: with a tiny model, intra-op threads on a shared machine measure contention, not the method.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mllm.data.images import load_image
from mllm.inference.api import ChatModel
from mllm.inference.stage_beam import StageBeamSearch, _inside


class StopOnStrings(StoppingCriteria):
    """LLaVA-CoT's criterion: decode the WHOLE sequence (prompt included) at every step."""

    def __init__(self, stops: list[str], tokenizer: Any) -> None:
        self.stops, self.tokenizer = stops, tokenizer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Reference:
    """A re-implementation of LLaVA-CoT's stage beam search (separate `generate` calls)."""

    def __init__(self, search: StageBeamSearch, seed: int) -> None:
        self.s = search  # for the model, the stages, the judge prompts and the settings
        self.rng = random.Random(seed)
        self.tokens = 0
        self.forwards = 0

    def _generate(
        self, ids: list[int], image: Any, stops: list[str], max_new: int, sample: bool
    ) -> list[int]:
        s = self.s
        pixel_values = s.processor.image_processor([image], return_tensors="pt")["pixel_values"]  # per call
        input_ids = torch.tensor([ids])
        kwargs: dict[str, Any] = {"do_sample": False}
        if sample:
            kwargs = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
        out = s.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            max_new_tokens=max_new,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(stops, s.tokenizer)] if stops else []),
            eos_token_id=sorted(s.stop_ids),
            pad_token_id=sorted(s.stop_ids)[0],
            **kwargs,
        )[0].tolist()
        new = len(out) - len(ids)
        self.tokens += len(ids) + max(0, new - 1)  # prefill, then one position per further token
        self.forwards += max(1, new)
        return out

    def run(self, question: str, image: Any) -> str:
        s = self.s
        prompt, _ = s.chat.prompt(f"<image>\n{question}", [image])
        s._images, s._n_images = [image], 1  # noqa: SLF001 -- the judge prompt layout of the search
        ids = s._ids(prompt)  # noqa: SLF001
        start = len(ids)
        accepted: dict[str, str] = {}
        for stage in s.stages:
            candidates = [
                self._generate(ids, image, [stage.close_tag], s.max_stage_tokens, True)
                for _ in range(s.beams)
            ]
            texts = {id(c): s.tokenizer.decode(c[start:], skip_special_tokens=True) for c in candidates}
            hint = " ".join(accepted.get(n, "") for n in stage.hint_from).strip()
            while len(candidates) > 1:  # random pairs, as the reference
                a = candidates.pop(self.rng.randrange(len(candidates)))
                b = candidates.pop(self.rng.randrange(len(candidates)))
                shown = [_inside(texts[id(c)], stage) for c in (a, b)]
                judge = s._judge_text(s._judge_prompt(stage.judge, stage.recall, question, hint, shown))  # noqa: SLF001
                judge_ids = s._ids(judge)  # noqa: SLF001
                # the reference's judge is a plain generate: no stop string (its prompt holds "I choose")
                out = self._generate(judge_ids, image, [], s.max_judge_tokens, False)
                verdict = s.tokenizer.decode(out[len(judge_ids) :], skip_special_tokens=True)
                candidates.append(a if "I choose response 1" in verdict else b)
            ids = candidates[0]
            accepted[stage.name] = _inside(texts[id(ids)], stage)
        return s.tokenizer.decode(ids[start:], skip_special_tokens=True)


def _questions(data: Path | None, n: int) -> list[tuple[str, Any, str]]:
    from PIL import Image

    if data is None:
        image = Image.new("RGB", (48, 48), (200, 40, 40))
        return [(f"what color is shape {i}?", image, "") for i in range(n)]
    rows = json.loads(data.read_text(encoding="utf-8"))[:n]
    out = []
    for row in rows:
        human, gpt = row["conversations"][0]["value"], row["conversations"][1]["value"]
        image = load_image(data.parent / row["image"], record_id=str(row["id"]), source=str(data))
        out.append((human.replace("<image>", "").strip(), image, _conclusion(gpt)))
    return out


def _conclusion(answer: str) -> str:
    return answer.split("<CONCLUSION>")[-1].split("</CONCLUSION>")[0].strip()


def _random_model(folder: Path) -> ChatModel:
    from mllm.models import MllmForConditionalGeneration, MllmProcessor
    from scripts.build_tiny_components import build_tiny_components

    parts = build_tiny_components(folder)
    torch.manual_seed(0)
    model = MllmForConditionalGeneration.from_components(
        parts["clip-vision"], parts["llama"], connector="mlp"
    )
    processor = MllmProcessor.from_components(
        str(parts["clip-vision"]), str(parts["llama"]), model.config.num_image_tokens
    )
    return ChatModel(model.eval(), processor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an `mllm train` run dir (default: a random tiny model)")
    parser.add_argument("--data", type=Path, help="LLaVA-CoT json (data_tools.synth's cot_test.json)")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--beams", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-stage-tokens", type=int, default=64)
    parser.add_argument("--max-judge-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--knockout",
        choices=("sequential", "bracket", "speculative"),
        default="bracket",
        help="mllm's knock-out order (the reference pairs at random); both make N-1 judgements per stage",
    )
    parser.add_argument(
        "--no-drafts",
        action="store_true",
        help="mllm decodes one token per forward (default: drafts checked several tokens per forward)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: a tiny model's steps are overhead-bound)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        chat = ChatModel.from_pretrained(args.model) if args.model else _random_model(Path(tmp))
        questions = _questions(args.data, args.questions)
        calls: list[int] = []
        base = chat.model.get_base_model() if hasattr(chat.model, "get_base_model") else chat.model
        base.vision_tower.register_forward_hook(lambda *a: calls.append(1))
        n_q = len(questions)
        for beams in args.beams:
            search = StageBeamSearch(
                chat,
                beams=beams,
                max_stage_tokens=args.max_stage_tokens,
                max_judge_tokens=args.max_judge_tokens,
                seed=args.seed,
                knockout=args.knockout,
                drafts=not args.no_drafts,
            )
            reference = Reference(search, args.seed)
            torch.manual_seed(args.seed)
            ref_answers, ours = [], []
            ref_s = ours_s = 0.0
            ref_vision = ours_vision = ours_tokens = ours_forwards = 0
            for q, image, _ in questions:  # alternate, so that both see the same machine load
                calls.clear()
                begin = time.perf_counter()
                with torch.inference_mode():
                    ref_answers.append(reference.run(q, image))
                ref_s, ref_vision = ref_s + time.perf_counter() - begin, ref_vision + len(calls)
                calls.clear()
                begin = time.perf_counter()
                ours.append(search.run(f"<image>\n{q}", [image]))
                ours_s, ours_vision = ours_s + time.perf_counter() - begin, ours_vision + len(calls)
                ours_tokens += search.tokens_computed
                ours_forwards += search.forwards
            ref_s, ours_s, ref_vision, ours_vision = (
                ref_s / n_q,
                ours_s / n_q,
                ref_vision / n_q,
                ours_vision / n_q,
            )
            em_ref = sum(_conclusion(a) == q[2] for a, q in zip(ref_answers, questions))
            em_ours = sum(r.conclusion == q[2] for r, q in zip(ours, questions))
            print(
                f"N={beams}: reference {ref_s:.3f} s/q, {reference.tokens / n_q:.0f} tokens/q,"
                f" {reference.forwards / n_q:.0f} forwards/q, vision {ref_vision:.0f}/q"
                f" | mllm ({args.knockout}) {ours_s:.3f} s/q, {ours_tokens / n_q:.0f} tokens/q,"
                f" {ours_forwards / n_q:.0f} forwards/q, vision {ours_vision:.0f}/q"
                f" | {ref_s / ours_s:.1f}x"
                + (
                    f" | conclusion exact match: reference {em_ref}/{n_q}, mllm {em_ours}/{n_q}"
                    if args.data
                    else ""
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
