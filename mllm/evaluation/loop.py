"""The one evaluation loop every task runs through: prompts, batched generation, resumption, outputs.

A task (``mllm/evaluation/tasks/*.py``, one file each, registered in :data:`TASKS`) says how to read
its data, what to ask and how to score; this module does the rest the same way for all of them:

- one prompt per sample, rendered with the chat template the model was trained with and asking
  exactly what the data asks (``--instruction`` appends text only when given);
- images loaded per batch; a missing or unreadable one skips its sample and is counted (``--strict``
  stops at the first);
- batched greedy generation stopped on the template's end-of-turn token, under one progress bar;
- every finished batch is appended to ``predictions.partial.jsonl`` in the output folder, so an
  interrupted run loses at most one batch. Re-running on the same folder skips every sample already
  predicted (a sample whose prompt changed is asked again) and says how many; the settings that
  change answers without changing the prompt (model weights, ``max_new_tokens``, blank images) are
  kept in ``eval_state.json``, and a run with other settings (or ``overwrite``) starts the folder
  again, saying why;
- at the end the task scores all predictions (corpus metrics such as CIDEr need them all) and
  ``predictions.jsonl`` (id, prompt, prediction, references, per-sample score, task fields) and
  ``metrics.json`` are written atomically, in data order: a resumed run writes the same files as an
  uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from mllm.data.formats import IMAGE_PLACEHOLDER, ImageRef, Turn
from mllm.registry import Registry

__all__ = [
    "BLANK_COLOR",
    "PARTIAL_FILE",
    "STATE_FILE",
    "TASKS",
    "EvalOptions",
    "EvalSample",
    "Sample",
    "Task",
    "blank_like",
    "model_fingerprint",
    "results_table",
    "run_task",
]

logger = logging.getLogger(__name__)

BLANK_COLOR = (128, 128, 128)  # mid-grey of --blank-images
PARTIAL_FILE = "predictions.partial.jsonl"  # finished batches of an unfinished run
STATE_FILE = "eval_state.json"  # settings the predictions in the folder were made with


@dataclass(frozen=True)
class EvalOptions:
    """Task options from the command line."""

    image_position: str = "before"  # rows without a placeholder: the image before / after the question
    instruction: str | None = None  # appended on a new line after the question, only when given
    metrics: tuple[str, ...] | None = None  # caption: the pycocoevalcap metrics (None: the default set)
    circular: bool = False  # mcq: MMBench circular evaluation (every rotation of the options asked)
    cot: bool = False  # score the <CONCLUSION> of a staged chain-of-thought answer (LLaVA-CoT)
    beams: int = 1  # cot: candidates per search step (1: one greedy answer, no search)
    search: str = "stage"  # cot with beams > 1: stage | best_of_n | sentence (StageBeamSearch methods)


class Sample(Protocol):
    """What the loop needs of a task's sample."""

    @property
    def id(self) -> str: ...  # unique in the file (resumption keys on it)

    @property
    def images(self) -> tuple[ImageRef, ...]: ...  # in placeholder order

    @property
    def source(self) -> str: ...  # "file.jsonl#12", for messages

    @property
    def references(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class EvalSample:
    """A sample of the caption, mcq and yesno tasks."""

    id: str
    question: str  # as in the data, or the rendered question (mcq options added)
    images: tuple[ImageRef, ...]
    references: tuple[str, ...]  # captions; the answer letter and its text (mcq); "yes" / "no"
    source: str
    context: tuple[Turn, ...] = ()  # a training record's turns before the question
    meta: dict[str, Any] = field(default_factory=dict)  # task fields (mcq options, circular group, ...)


class Task(Protocol):
    """One evaluation task: how to read its data, what to ask, how to score."""

    name: str

    def load(
        self, data: str, image_folder: str | None, limit: int | None, options: EvalOptions
    ) -> Sequence[Sample]: ...

    def prompt_turns(self, sample: Any, image_token: str, options: EvalOptions) -> list[Turn]: ...

    def fields(self, sample: Any) -> dict[str, Any]: ...  # task columns of a prediction row

    def score(
        self, samples: Sequence[Any], predictions: Sequence[str], options: EvalOptions
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]: ...  # per-sample columns (with "score"), metrics


TASKS: Registry[Task] = Registry("evaluation task")


def blank_like(image: Image.Image) -> Image.Image:
    """A mid-grey RGB image of the same size as ``image``."""
    return Image.new("RGB", image.size, BLANK_COLOR)


def _load_images(sample: Sample, blank: bool) -> list[Image.Image]:
    """The sample's images, decoded (mid-grey ones with ``blank``); raises ``BadRecordError``."""
    from mllm.data.images import load_image

    images = []
    for ref in sample.images:
        image = load_image(ref, record_id=sample.id, source=sample.source)
        if blank:
            grey = blank_like(image)
            image.close()
            image = grey
        images.append(image)
    return images


def model_fingerprint(model: Any) -> str:
    """Parameter count and sum of every weight: tells a retrained model from the one that made the
    predictions in an output folder (one pass over the weights, no copy)."""
    import torch

    with torch.inference_mode():
        params = list(model.parameters())
        total = sum(float(p.detach().float().sum()) for p in params)
        count = sum(p.numel() for p in params)
    return f"{count}:{total:.6e}"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a predictions file; a line cut by an interruption (the last one) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row and "prediction" in row:
            rows.append(row)
    return rows


def _prepare_output(output: Path, state: dict[str, Any], overwrite: bool) -> None:
    """Keep the folder's predictions only when they were made with these settings: with ``overwrite``,
    or when the model, ``max_new_tokens`` or blank images changed, they are discarded (and said so)."""
    from mllm.io import atomic_write_text

    state_path = output / STATE_FILE
    made = [output / "predictions.jsonl", output / PARTIAL_FILE]
    if not overwrite and state_path.exists() and any(p.exists() for p in made):
        before = json.loads(state_path.read_text(encoding="utf-8"))
        changed = [k for k in state if before.get(k) != state[k]]
        if changed:
            diff = "; ".join(f"{k}: {before.get(k)!r} there, {state[k]!r} now" for k in changed)
            print(
                f"{output} holds predictions made with other settings ({diff}); starting again there",
                file=sys.stderr,
                flush=True,
            )
            overwrite = True
    if overwrite:
        for name in ("predictions.jsonl", PARTIAL_FILE, "metrics.json", STATE_FILE):
            (output / name).unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")


def _unique_ids(samples: Sequence[Sample]) -> list[str]:
    """The samples' ids, a repeated one suffixed ``#2``, ``#3``... (resumption needs one key each)."""
    seen: Counter[str] = Counter()
    ids = []
    for sample in samples:
        seen[sample.id] += 1
        ids.append(sample.id if seen[sample.id] == 1 else f"{sample.id}#{seen[sample.id]}")
    return ids


def run_task(
    task: Task,
    model: Any,
    processor: Any,
    *,
    data: str,
    output: str | os.PathLike[str],
    image_folder: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    template: str | None = None,
    limit: int | None = None,
    blank_images: bool = False,
    options: EvalOptions = EvalOptions(),
    strict: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict every sample of ``data`` not yet predicted in ``output``, score them all, write
    ``predictions.jsonl`` and ``metrics.json``; returns the metrics."""
    from tqdm.auto import tqdm

    import mllm.inference.generate as generate
    from mllm.data.errors import BadRecordError
    from mllm.data.formats import save_json, save_jsonl
    from mllm.data.templates import end_of_turn_token_ids

    output = Path(output)
    samples = list(task.load(data, image_folder, limit, options))
    if options.cot:
        samples = [_conclusion_references(s) for s in samples]
    ids = _unique_ids(samples)
    image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
    prompts = [
        generate.build_generation_prompt(
            task.prompt_turns(s, image_token, options), processor.tokenizer, template
        )
        for s in samples
    ]
    state = {
        "task": task.name,
        "model": model_fingerprint(model),
        "max_new_tokens": max_new_tokens,
        "blank_images": blank_images,
    }  # the prompt (template, instruction, image position) is checked per sample
    if options.cot:
        state.update(cot=True, beams=options.beams, search=options.search)
    _prepare_output(output, state, overwrite)
    partial = output / PARTIAL_FILE
    by_id = {ids[i]: prompts[i] for i in range(len(samples))}
    done: dict[str, str] = {}  # id -> prediction, from an earlier run on this folder
    traces: dict[str, Any] = {}  # cot: id -> the search trace
    for row in [*_read_rows(output / "predictions.jsonl"), *_read_rows(partial)]:
        if by_id.get(row["id"]) == row.get("prompt"):
            done[str(row["id"])] = str(row.get("cot_answer", row["prediction"]))
            if row.get("cot_trace") is not None:
                traces[str(row["id"])] = row["cot_trace"]
    if done:
        print(
            f"resuming in {output}: {len(done)} of {len(samples)} samples already predicted, "
            f"predicting the other {len(samples) - len(done)}",
            file=sys.stderr,
            flush=True,
        )
    # the partial file restarts from what is kept, so a stale row (other prompt) never comes back
    save_jsonl([_partial_row(i, by_id[i], p, traces.get(i)) for i, p in done.items()], partial)

    stop_ids = end_of_turn_token_ids(processor.tokenizer, template)  # answers end where training ended them
    searcher = _searcher(model, processor, template, options, max_new_tokens) if options.cot else None
    todo = [i for i in range(len(samples)) if ids[i] not in done]
    skipped: list[dict[str, str]] = []
    with (
        tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"eval {task.name}", unit="q") as bar,
        partial.open("a", encoding="utf-8") as sink,
    ):
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for i in todo[start : start + batch_size]:
                try:
                    images.append(_load_images(samples[i], blank_images))
                except BadRecordError as err:
                    if strict:
                        raise
                    skipped.append({"question_id": ids[i], "reason": err.reason, "detail": str(err)})
                    logger.warning("skipped sample %s: %s", ids[i], err)
                    bar.update(1)
                    continue
                batch.append(i)
            if not batch:
                continue
            batch_traces: list[Any] = [None] * len(batch)
            if options.cot and options.beams > 1:
                answers, batch_traces = _search_answers(
                    searcher,
                    [ids[i] for i in batch],
                    [task.prompt_turns(samples[i], image_token, options) for i in batch],
                    images,
                )
            else:
                answers = generate.generate_answers(
                    model,
                    processor,
                    [prompts[i] for i in batch],
                    images,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    stop_token_ids=stop_ids,
                )
            for group in images:
                for image in group:
                    image.close()
            for i, answer, trace in zip(batch, answers, batch_traces):
                done[ids[i]] = answer
                traces[ids[i]] = trace
                sink.write(json.dumps(_partial_row(ids[i], prompts[i], answer, trace)) + "\n")
            sink.flush()
            bar.update(len(batch))

    answered = [i for i in range(len(samples)) if ids[i] in done]
    predictions = [done[ids[i]] for i in answered]
    if options.cot:
        from mllm.inference.stage_beam import stage_text

        full, predictions = predictions, [stage_text(a) for a in predictions]
    per_sample, metrics = task.score([samples[i] for i in answered], predictions, options)
    rows = [
        {
            "id": ids[i],
            "prompt": prompts[i],
            "prediction": prediction,
            "references": list(samples[i].references),
            **columns,
            **task.fields(samples[i]),
        }
        for i, prediction, columns in zip(answered, predictions, per_sample)
    ]
    metrics = {**metrics, "num_samples": len(answered), "num_skipped": len(skipped)}
    if options.cot:
        for row, i, answer in zip(rows, answered, full):
            row.update(cot_answer=answer, cot_trace=traces.get(ids[i]))
        metrics.update(
            cot={"beams": options.beams, "search": options.search if options.beams > 1 else "none"},
            no_conclusion=sum(1 for p in predictions if not p),
        )
    if skipped:
        metrics.update(skipped=dict(Counter(s["reason"] for s in skipped)), skipped_questions=skipped)
        logger.warning(
            "skipped %d of %d samples whose image could not be read (%s); metrics are over the other %d. "
            "--strict stops at the first one instead.",
            len(skipped),
            len(samples),
            ", ".join(f"{k}: {v}" for k, v in metrics["skipped"].items()),
            len(answered),
        )
    save_jsonl(rows, output / "predictions.jsonl")
    save_json(metrics, output / "metrics.json")
    partial.unlink(missing_ok=True)
    return metrics


def _partial_row(sample_id: str, prompt: str, prediction: str, trace: Any) -> dict[str, Any]:
    """A row of the partial predictions file; a searched answer keeps its trace."""
    row = {"id": sample_id, "prompt": prompt, "prediction": prediction}
    if trace is not None:
        row["cot_trace"] = trace
    return row


def _conclusion_references(sample: Any) -> Any:
    """``sample`` with each reference that is a staged answer replaced by its <CONCLUSION> text (a
    plain reference, such as a VQA answer, is kept)."""
    import dataclasses

    from mllm.inference.stage_beam import stage_text

    refs = tuple(stage_text(r) or r for r in sample.references)
    field_name = "answers" if hasattr(sample, "answers") else "references"
    return dataclasses.replace(sample, **{field_name: refs})


def _searcher(
    model: Any, processor: Any, template: str | None, options: EvalOptions, max_new_tokens: int
) -> Any:
    """The `StageBeamSearch` of ``--cot --beams N`` (None without search); ``max_new_tokens`` bounds
    each search step."""
    if options.beams <= 1:
        return None
    from mllm.inference.api import ChatModel
    from mllm.inference.stage_beam import StageBeamSearch

    chat = ChatModel(model, processor, template)
    return StageBeamSearch(
        chat, beams=options.beams, method=options.search, max_stage_tokens=max_new_tokens, seed=0,
        knockout="bracket",
    )  # fmt: skip


def _search_answers(
    searcher: Any, ids: list[str], conversations: list[list[Turn]], images: list[list[Image.Image]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """One searched answer and its trace per conversation, one question at a time. Each question's
    sampling is seeded from its id, so a resumed run draws what an uninterrupted one drew."""
    import zlib

    import torch

    answers, traces = [], []
    for sample_id, turns, group in zip(ids, conversations, images):
        searcher.generator = torch.Generator().manual_seed(zlib.crc32(sample_id.encode("utf-8")))
        searcher.forget_drafts()  # drafts from earlier questions would change how many draws it takes
        result = searcher.run(turns, group)
        answers.append(result.answer)
        traces.append(result.trace)
    return answers, traces


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def results_table(task: str, metrics: dict[str, Any]) -> str:
    """The metrics as a two-column text table (numbers only; nested figures stay in metrics.json)."""
    flat = [
        (k, _number(v)) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for key, value in metrics.items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            flat.extend((f"{key}.{k}", _number(v)) for k, v in value.items())
    width = max([len("metric"), *(len(k) for k, _ in flat)])
    vwidth = max([len("value"), *(len(v) for _, v in flat)])
    lines = [
        f"{task} results",
        f"| {'metric':<{width}} | {'value':>{vwidth}} |",
        f"|{'-' * (width + 2)}|{'-' * (vwidth + 1)}:|",
    ]
    lines += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in flat]
    for key, value in metrics.items():  # caption metrics that could not run, with the reason
        if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
            lines += [f"{key}: {k}: {v}" for k, v in value.items()]
    return "\n".join(lines)
