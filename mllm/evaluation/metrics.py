"""Answer normalisation, exact match and the official VQA accuracy, plus a per-task metric registry.

``vqa_accuracy`` reproduces the official VQA evaluation script, quirks included:
https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py
(commit a013f00 "Fixed processing answers bug", 2021; ``processPunctuation``, ``processDigitArticle``
and ``evaluate``). The code here is our own. ``vqa_accuracy_normalized`` is the lenient variant that
normalises both sides always.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from mllm.registry import Registry

__all__ = [
    "METRICS",
    "TASK_METRICS",
    "CorpusMetric",
    "compute_metrics",
    "exact_match",
    "normalize_answer",
    "vqa_accuracy",
    "vqa_accuracy_normalized",
]

# Contractions written without their apostrophe -> the apostrophe form (vqaEval.py ``contractions``).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# vqaEval.py ``self.punct``; the period has its own rule (``_PERIOD``).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# vqaEval.py ``commaStrip = re.compile("(\d)(\,)(\d)")``. re.ASCII: the script is Python 2 and compiles
# without re.UNICODE, so its ``\d`` is [0-9] only (Python 3 would also match other scripts' digits).
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)", re.ASCII)
# vqaEval.py ``periodStrip = re.compile("(?!<=\d)(\.)(?!\d)")``, kept as written: ``(?!<=\d)`` is a
# negative *lookahead* for the text "<=digit" (a typo for the lookbehind ``(?<!\d)``); before a "."
# it always holds, so the pattern is "a period not followed by a digit": "3.5" and ".5" keep it,
# "yes." and "5." lose it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# vqaEval.py calls ``periodStrip.sub("", outText, re.UNICODE)``: the flag lands in the *count*
# argument, and re.UNICODE == 32, so at most 32 periods are removed.
_PERIOD_MAX_SUBSTITUTIONS = 32


def _clean_whitespace(text: str) -> str:
    """vqaEval ``evaluate``: ``.replace('\\n', ' ')``, ``.replace('\\t', ' ')``, ``.strip()`` -- the only
    processing the official script applies to every answer and prediction."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """vqaEval ``processPunctuation``: a mark is deleted when it stands next to a space in the input
    or the input holds a digit-comma-digit anywhere ("1,000" -> "1000", and then *every* mark of
    the text is deleted); otherwise it becomes a space ("black/white" -> "black white"). Then up to
    32 periods not followed by a digit are deleted."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or delete_all:  # tested on the input text
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_SUBSTITUTIONS)


def _process_digit_article(text: str) -> str:
    """vqaEval ``processDigitArticle``: lowercase, split on whitespace, number words -> digits
    (``manualMap``), drop articles, then contractions; join with single spaces. The table's keys with
    capitals ("Im", "Ive", "Id've") never match after lowercasing; kept as the script has them."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """The official VQA normalisation, applied in full: whitespace, ``processPunctuation``, then
    ``processDigitArticle`` (``"Two dogs."`` -> ``"2 dogs"``)."""
    return _process_digit_article(_process_punctuation(_clean_whitespace(s)))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(answer) for answer in answers))


def _leave_one_out(pred: str, answers: Sequence[str]) -> float:
    """vqaEval ``evaluate``: for each annotator left out, ``min(1, #other annotators whose answer ==
    pred / 3)``; the mean over the annotators. The script leaves out one answer *dict* (answer ids
    differ), i.e. exactly one annotator even when several gave the same string."""
    matches = sum(answer == pred for answer in answers)
    scores = [min(1.0, (matches - (left_out == pred)) / 3.0) for left_out in answers]
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy, as the official script computes it (quirks included).

    Both sides get newline/tab -> space and strip. Then, only when the cleaned answers are not all
    identical (``if len(set(gtAnswers)) > 1``), the prediction *and* every answer get
    ``processPunctuation`` and ``processDigitArticle`` (lowercase, number words, articles,
    contractions). When all answers are identical nothing more is done, so ``"The red one"`` against
    ten ``"red one"`` scores 0.0 and ``"Yes"`` against ten ``"yes"`` scores 0.0. The score is the
    leave-one-out mean of ``min(1, matches among the other annotators / 3)``: m of 10 matching gives
    0.0, 0.3, 0.6, 0.9, then 1.0 from m = 4.

    A single reference answer (non-VQA data) is not scored by the script's rule, which would give
    0.0 always (no other annotator is left to agree); it is scored as exact match after the
    official normalisation of both sides (``normalize_answer``), so ``("two", ["2"])`` is 1.0.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer.")
    pred = _clean_whitespace(prediction)
    refs = [_clean_whitespace(answer) for answer in answers]
    if len(refs) == 1:
        return float(normalize_answer(pred) == normalize_answer(refs[0]))
    if len(set(refs)) > 1:  # the official script normalises only in this case
        pred = normalize_answer(pred)
        refs = [normalize_answer(answer) for answer in refs]
    return _leave_one_out(pred, refs)


def vqa_accuracy_normalized(prediction: str, answers: Sequence[str]) -> float:
    """Lenient VQA accuracy: the official leave-one-out score with the prediction and every answer
    always fully normalised (``normalize_answer``), whether or not the answers agree; a single
    reference answer is scored as exact match of the normalised strings."""
    if not answers:
        raise ValueError("vqa_accuracy_normalized needs at least one reference answer.")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(answer) for answer in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    return _leave_one_out(pred, refs)


CorpusMetric = Callable[[Sequence[str], Sequence[Sequence[str]]], float]
"""``(predictions, references per prediction) -> score``: corpus-level, so CIDEr-like metrics fit."""

METRICS: Registry[CorpusMetric] = Registry("metric")


def _mean_of(per_sample: Callable[[str, Sequence[str]], float]) -> CorpusMetric:
    def corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
        if not predictions:
            return 0.0
        return sum(per_sample(p, r) for p, r in zip(predictions, references)) / len(predictions)

    corpus.__doc__ = f"Mean of `{per_sample.__name__}` over the samples."
    return corpus


METRICS.add("exact_match", _mean_of(exact_match))
METRICS.add("vqa_accuracy", _mean_of(vqa_accuracy))
METRICS.add("vqa_accuracy_normalized", _mean_of(vqa_accuracy_normalized))


_CAPTION_SCORERS = {"Bleu_1": "bleu", "Bleu_2": "bleu", "Bleu_3": "bleu", "Bleu_4": "bleu", "METEOR": "meteor",
                    "ROUGE_L": "rouge", "CIDEr": "cider"}  # fmt: skip


def _caption_metric(key: str) -> CorpusMetric:
    """One pycocoevalcap score (``mllm.evaluation.caption_eval``); `--task caption` computes them all
    in one pass instead. A score that cannot be computed (METEOR without java) raises, never 0."""

    def corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        from mllm.evaluation.caption_eval import caption_scores

        result = caption_scores(predictions, references, (_CAPTION_SCORERS[key],))
        if key not in result.scores:
            raise RuntimeError(f"{key} could not be computed: {result.skipped.get(key, 'unknown reason')}.")
        return result.scores[key]

    corpus.__doc__ = f"pycocoevalcap's corpus {key}."
    return corpus


def _yes_no_metric(key: str) -> CorpusMetric:
    """One POPE figure (``mllm.evaluation.tasks.yesno``): predictions parsed as yes / no / neither,
    ``references[i][0]`` the label."""

    def corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        from mllm.evaluation.yesno_metrics import parse_yes_no, yes_no_metrics

        labels = [str(refs[0]).strip().lower() for refs in references]
        return float(yes_no_metrics([parse_yes_no(p) for p in predictions], labels)[key])

    corpus.__doc__ = f"POPE's {key} with yes as the positive class."
    return corpus


for _key in _CAPTION_SCORERS:
    METRICS.add(_key, _caption_metric(_key))
for _key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
    METRICS.add(f"pope_{_key}", _yes_no_metric(_key))

# Task -> the metrics of METRICS it reports (retrieval: recall@k slots in here). mcq scores need each
# question's options, so its metrics live in mllm.evaluation.tasks.mcq alone; yesno's are pope_*.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "vqa": ("exact_match", "vqa_accuracy", "vqa_accuracy_normalized"),
    "caption": tuple(_CAPTION_SCORERS),
    "yesno": tuple(f"pope_{k}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")),
}


def compute_metrics(
    task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Every metric registered for ``task``, by name."""
    if task not in TASK_METRICS:
        raise ValueError(
            f"no metrics for task `{task}`; tasks with metrics: {', '.join(sorted(TASK_METRICS))}."
        )
    return {name: METRICS.get(name)(predictions, references) for name in TASK_METRICS[task]}
