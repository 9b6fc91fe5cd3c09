"""Multiple-choice matching and MMBench's circular evaluation.

How a prediction is matched to an option (:func:`match_choice`), first rule that applies:

1. **A letter**: the answer is the letter alone (``B``, ``(B)``, ``B.``, ``B)``, ``B:``), starts with a
   lettered option (``B. cat``, ``(B) cat``, ``B) cat``, ``B: cat``), or says ``Answer: B`` /
   ``The answer is B`` (any case, same forms). Capital letters only, and only letters that name an
   option: ``A cat`` is not the letter A.
2. **The option text**: lowercased, punctuation and extra spaces removed, the answer equals exactly
   one option's text (``"Cat."`` -> the option ``cat``).
3. **An option inside the answer**: the options whose text occurs in the answer as whole words, after
   dropping any that is part of a longer one also found (``dark red`` over ``red``); exactly one left.
4. Otherwise the answer is unmatched: wrong, and counted (``num_unmatched``).

Circular evaluation (MMBench, Liu et al. 2023, https://arxiv.org/abs/2307.06281, sec. 3.1 "CircularEval";
OpenCompass ``mmbench`` ``circular`` mode): a question with N options is asked N times, its options
rotated by 0..N-1 places (the right answer's letter moves with its text); it counts as right only if
every rotation is answered right.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["LETTERS", "match_choice", "normalize_option", "parse_inline_options", "rotate"]

LETTERS = string.ascii_uppercase
_FORMS = (
    r"\(?([A-Z])\)?[.:)]?",  # the letter alone
    r"\(?([A-Z])[.:)]\s.*",  # "B. cat", "B) cat", "(B) cat", "B: cat"
    r"\(([A-Z])\)\s.*",
    r"(?i:(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\s*[:：]?)\s*\(?([A-Z])\)?(?:[.:)\s].*)?",
)
_LETTER_FORMS = [re.compile(form, re.DOTALL) for form in _FORMS]
_OPTION_LINE = re.compile(r"(?:^|\s)\(?([A-Z])[.)]\s+")


def normalize_option(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: how option texts and answers are compared."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def match_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The letter of the option ``prediction`` names (rules in the module doc), or None."""
    letters = LETTERS[: len(options)]
    text = prediction.strip().strip("*`\"' ")
    for form in _LETTER_FORMS:
        found = form.fullmatch(text)
        if found and found.group(1) in letters:
            return found.group(1)
    answer = normalize_option(text)
    normalized = [normalize_option(o) for o in options]
    equal = [letters[i] for i, o in enumerate(normalized) if o and o == answer]
    if len(equal) == 1:
        return equal[0]
    inside = [i for i, o in enumerate(normalized) if o and f" {o} " in f" {answer} "]
    inside = [
        i for i in inside if not any(i != j and f" {normalized[i]} " in f" {normalized[j]} " for j in inside)
    ]
    return letters[inside[0]] if len(inside) == 1 else None


def parse_inline_options(question: str) -> tuple[str, list[str]] | None:
    """``"What is it?\\nA. cat\\nB. dog"`` (or ``A. cat B. dog`` on one line, ``(A) cat``, ``A) cat``) ->
    ``("What is it?", ["cat", "dog"])``; None when the question holds no options A, B, ... in order."""
    marks = list(_OPTION_LINE.finditer(question))
    # the last run A, B, C, ... (an "A." earlier in the stem is not an option)
    for first in reversed(range(len(marks))):
        if marks[first].group(1) != "A":
            continue
        run = [marks[first]]
        for mark in marks[first + 1 :]:
            if mark.group(1) == LETTERS[len(run)]:
                run.append(mark)
        if len(run) >= 2:
            stem = question[: run[0].start()].strip()
            bounds = [m.end() for m in run]
            ends = [m.start() for m in run[1:]] + [len(question)]
            return stem, [question[b:e].strip() for b, e in zip(bounds, ends)]
    return None


def rotate(options: Sequence[str], answer: int, shift: int) -> tuple[list[str], int]:
    """The options moved ``shift`` places to the left and the new index of the right one."""
    n = len(options)
    return [options[(i + shift) % n] for i in range(n)], (answer - shift) % n
