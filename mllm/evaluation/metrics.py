"""Answer normalisation, exact match and the official VQA accuracy, plus a per-task metric registry.

The normalisation and the accuracy follow the official VQA evaluation script
(https://github.com/GT-Vision-Lab/VQA/blob/master/PythonHelperTools/vqaEvaluation/vqaEval.py,
``processPunctuation``, ``processDigitArticle`` and ``evaluate``); the code here is our own.
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
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")  # "1,000": punctuation is deleted, not spaced
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)


def _strip_punctuation(text: str) -> str:
    """vqaEval ``processPunctuation``: a mark next to a space (or any mark in a text holding a
    digit-comma-digit) is deleted; otherwise it becomes a space ("black/white" -> "black white")."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    """vqaEval ``processDigitArticle``: number words -> digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """VQA answer normalisation: lowercase, punctuation, number words to digits, no articles,
    contractions, single spaces (``"Two dogs."`` -> ``"2 dogs"``)."""
    text = s.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_articles_contractions(_strip_punctuation(text))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(answer) for answer in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: ``min(#annotators who gave the answer / 3, 1)`` averaged over the n
    leave-one-out subsets of the n annotators (the 10-choose-9 subsets for VQA's 10 answers).

    Predictions and answers are both normalised (the official script normalises the prediction and
    relies on annotations already stored normalised). A single reference answer has no
    leave-one-out subset, so it is scored as exact match.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer.")
    pred = normalize_answer(prediction)
    normalized = [normalize_answer(answer) for answer in answers]
    if len(normalized) == 1:
        return float(pred == normalized[0])
    matches = sum(answer == pred for answer in normalized)
    scores = []
    for left_out in normalized:  # each annotator left out once; the others vote
        others = matches - (left_out == pred)
        scores.append(min(1.0, others / 3.0))
    return sum(scores) / len(scores)


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

# Task -> the metrics its runner reports (caption: cider/bleu, retrieval: recall@k slot in here).
TASK_METRICS: dict[str, tuple[str, ...]] = {"vqa": ("exact_match", "vqa_accuracy")}


def compute_metrics(
    task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Every metric registered for ``task``, by name."""
    if task not in TASK_METRICS:
        raise ValueError(
            f"no metrics for task `{task}`; tasks with metrics: {', '.join(sorted(TASK_METRICS))}."
        )
    return {name: METRICS.get(name)(predictions, references) for name in TASK_METRICS[task]}
