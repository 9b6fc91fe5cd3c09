"""`--task mcq`: multiple choice (MMBench, SEED-Bench, ScienceQA style), accuracy and circular accuracy.

A row: ``question`` (or ``text``), the options as ``options`` (a list, or a mapping letter -> text), as
MMBench's columns ``A``, ``B``, ``C``, ... or written in the question (``A. cat`` lines or ``A. cat B.
dog`` on one line); ``answer`` the right letter, the right option's text or its 0-based index; optional
``hint`` (MMBench: asked before the question), ``id`` / ``question_id`` / ``index``, ``image``,
``category``. A training record is asked its last user turn, which holds the options; its last
assistant turn is the answer (a letter or the text). Options given apart from the question are shown
as MMBench's LLaVA prompt shows them: ``{hint}\\n{question}\\nA. {option}\\nB. ...``; a question that
holds its options is asked as written. Nothing else is added (``--instruction "Answer with the
option's letter from the given choices directly."`` is LLaVA-1.5's MMBench suffix).

The prediction is matched to an option by :func:`mllm.evaluation.choice.match_choice` (a letter,
then the option text, then one option inside the answer). ``--circular`` asks every question once per
rotation of its options (MMBench CircularEval): ``circular_accuracy`` counts a question right only if
every rotation is; ``accuracy`` is then over the unrotated questions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mllm.data.formats import Turn
from mllm.evaluation.choice import LETTERS, match_choice, parse_inline_options, rotate
from mllm.evaluation.loop import TASKS, EvalOptions, EvalSample
from mllm.evaluation.records import ConversationRecord, RowContext, read_eval_records, row_images
from mllm.evaluation.tasks.vqa import image_field, prompt_turns

__all__ = ["LLAVA_MCQ_INSTRUCTION", "McqTask", "load_mcq_samples"]

LLAVA_MCQ_INSTRUCTION = (
    "Answer with the option's letter from the given choices directly."  # LLaVA-1.5 MMBench
)


def _options_of(row: dict[str, Any]) -> list[str] | None:
    raw = row.get("options", row.get("choices"))
    if isinstance(raw, dict):
        return [str(raw[k]) for k in sorted(raw)]
    if isinstance(raw, list):
        return [str(o) for o in raw]
    columns = []  # MMBench's A, B, C, D columns (empty / NaN ones end the list)
    for letter in LETTERS:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
            break
        columns.append(str(value))
    return columns or None


def _answer_index(answer: Any, options: Sequence[str], source: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    text = str(answer).strip()
    if len(text) == 1 and text in LETTERS[: len(options)]:
        return LETTERS.index(text)
    letter = match_choice(text, options)
    if letter is None:
        raise ValueError(
            f"{source}: the answer {answer!r} is neither an option letter ({', '.join(LETTERS[: len(options)])}) "
            "nor one option's text."
        )
    return LETTERS.index(letter)


def _render(stem: str, options: Sequence[str], hint: str | None) -> str:
    lines = [hint] if hint else []
    lines += [stem, *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))]
    return "\n".join(lines)


def _question(
    qid: str,
    stem_or_question: str,
    options: list[str] | None,
    answer: Any,
    hint: str | None,
    base: dict[str, Any],
) -> dict[str, Any]:
    """One question before expansion: id, stem, options, answer index, whether the options were inline."""
    inline = options is None
    if inline:
        parsed = parse_inline_options(stem_or_question)
        if parsed is None:
            raise ValueError(
                f"{base['source']}: a multiple-choice question needs `options` (a list), columns A, B, ... or "
                "options written in the question (`A. ...` `B. ...`)."
            )
        stem, options = parsed
    else:
        stem = stem_or_question
    assert options is not None
    if len(options) < 2:
        raise ValueError(f"{base['source']}: a multiple-choice question needs at least two options.")
    return {
        **base,
        "id": qid,
        "stem": stem,
        "question": stem_or_question,
        "options": options,
        "answer": _answer_index(answer, options, base["source"]),
        "hint": hint,
        "inline": inline,
    }


def _from_row(row: dict[str, Any], ctx: RowContext) -> dict[str, Any] | None:
    question = row.get("question", row.get("text"))
    if question is None or ("answer" not in row and "label" not in row):
        return None
    qid = row.get("id", row.get("question_id", row.get("index", ctx.source)))
    hint = row.get("hint")
    hint = (
        None
        if hint is None or (isinstance(hint, float) and hint != hint) or not str(hint).strip()
        else str(hint)
    )
    base = {
        "source": ctx.source,
        "images": row_images(row, ctx),
        "context": (),
        "category": row.get("category"),
    }
    return _question(
        str(qid), str(question), _options_of(row), row.get("answer", row.get("label")), hint, base
    )


def _from_conversation(record: ConversationRecord) -> dict[str, Any]:
    base = {"source": record.source, "images": record.images, "context": record.context,
            "category": record.raw.get("category")}  # fmt: skip
    return _question(record.id, record.question, _options_of(record.raw), record.answer, None, base)


def _expand(q: dict[str, Any], circular: bool) -> list[EvalSample]:
    shifts = range(len(q["options"])) if circular else range(1)
    samples = []
    for shift in shifts:
        options, answer = rotate(q["options"], q["answer"], shift)
        if q["inline"] and shift == 0:
            question = q["question"]  # a question that holds its options is asked as written
        else:
            question = _render(q["stem"], options, q["hint"])
        samples.append(
            EvalSample(
                id=q["id"] if shift == 0 else f"{q['id']}@rot{shift}",
                question=question,
                images=q["images"],
                references=(LETTERS[answer], options[answer]),
                source=q["source"],
                context=q["context"],
                meta={
                    "group": q["id"],
                    "shift": shift,
                    "options": options,
                    "answer": LETTERS[answer],
                    "category": q["category"],
                },  # fmt: skip
            )
        )
    return samples


def load_mcq_samples(
    data: str, image_folder: str | None = None, limit: int | None = None, circular: bool = False
) -> list[EvalSample]:
    """The questions of ``data`` (the first ``limit``), each once per rotation with ``circular``."""
    questions = read_eval_records(
        data,
        image_folder,
        limit,
        from_row=_from_row,
        from_conversation=_from_conversation,
        row_shape="a multiple-choice row with a `question`, options and an `answer`",
    )
    return [s for q in questions for s in _expand(q, circular)]


class McqTask:
    """Multiple choice: accuracy, MMBench circular accuracy with ``--circular``."""

    name = "mcq"

    def load(
        self, data: str, image_folder: str | None, limit: int | None, options: EvalOptions
    ) -> list[EvalSample]:
        return load_mcq_samples(data, image_folder, limit, circular=options.circular)

    def prompt_turns(self, sample: EvalSample, image_token: str, options: EvalOptions) -> list[Turn]:
        return prompt_turns(
            sample,
            image_token=image_token,
            image_position=options.image_position,
            instruction=options.instruction,
        )

    def fields(self, sample: EvalSample) -> dict[str, Any]:
        row = {"question": sample.question, "image": image_field(sample), "options": sample.meta["options"],
               "answer": sample.meta["answer"]}  # fmt: skip
        if sample.meta["shift"]:
            row.update(group=sample.meta["group"], shift=sample.meta["shift"])
        return row

    def score(
        self, samples: Sequence[EvalSample], predictions: Sequence[str], options: EvalOptions
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        per_sample = []
        for sample, prediction in zip(samples, predictions):
            choice = match_choice(prediction, sample.meta["options"])
            per_sample.append({"choice": choice, "score": float(choice == sample.meta["answer"])})
        plain = [c["score"] for s, c in zip(samples, per_sample) if s.meta["shift"] == 0]
        metrics: dict[str, Any] = {
            "accuracy": sum(plain) / len(plain) if plain else 0.0,
            "num_unmatched": sum(c["choice"] is None for c in per_sample),
        }
        if options.circular:
            groups: dict[str, list[float]] = {}
            for sample, c in zip(samples, per_sample):
                groups.setdefault(sample.meta["group"], []).append(c["score"])
            metrics["circular_accuracy"] = (
                sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0
            )
            metrics["num_questions"] = len(groups)
        categories: dict[str, list[float]] = {}
        for sample, c in zip(samples, per_sample):
            if sample.meta["category"] is not None and sample.meta["shift"] == 0:
                categories.setdefault(str(sample.meta["category"]), []).append(c["score"])
        if categories:
            metrics["accuracy_by_category"] = {k: sum(v) / len(v) for k, v in sorted(categories.items())}
        return per_sample, metrics


TASKS.add("mcq", McqTask())
