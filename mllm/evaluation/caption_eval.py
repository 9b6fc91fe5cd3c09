"""Caption metrics computed by ``pycocoevalcap`` itself (the COCO caption evaluation code).

https://github.com/salaniz/pycocoevalcap (pip ``pycocoevalcap``, the ``eval`` extra), the Python 3 port
of tylin/coco-caption used by the COCO leaderboard, LLaVA, BLIP-2 and lmms-eval. As
``pycocoevalcap.eval.COCOEvalCap.evaluate`` does: every caption goes through the Stanford PTB
tokenizer (``-lowerCase``, punctuation tokens dropped), then ``Bleu(4)``, ``Meteor``, ``Rouge`` and
``Cider`` (which is CIDEr-D: clipped counts and the Gaussian length penalty, sigma 6) score the
tokenised text. Keys are pycocoevalcap's own names: ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``,
``CIDEr`` and, on request, ``SPICE``.

The PTB tokenizer and METEOR run in Java. Without ``java`` on PATH, METEOR (and SPICE) are skipped
and named in :attr:`CaptionScores.skipped` with the reason, and the other metrics are computed on
text tokenised by :func:`simple_tokenize` (lowercase, PTB-style split, the same punctuation dropped)
-- close to, but not guaranteed equal to, the official numbers, which :attr:`CaptionScores.tokenizer`
says. SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use (~400 MB), so it
is computed only when asked for; when it cannot run it is skipped with the reason, never a zero.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "CAPTION_METRICS",
    "DEFAULT_CAPTION_METRICS",
    "CaptionScores",
    "caption_metrics",
    "caption_scores",
    "java_available",
    "simple_tokenize",
]

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_METRICS = ("bleu", "meteor", "rouge", "cider")  # what `--task caption` reports
CAPTION_METRICS = (*DEFAULT_CAPTION_METRICS, "spice")  # names accepted by --metrics
_KEYS = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
}
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, the tokens its tokenize() drops
_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_TOKEN = re.compile(r"\.\.\.|--|``|''|n't|'\w*|\w+(?:[-.]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class CaptionScores:
    """Corpus scores by pycocoevalcap name, per-caption CIDEr, and what could not be computed."""

    scores: dict[str, float]  # Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (SPICE)
    per_sample: dict[str, list[float]]  # metric -> one score per prediction (Bleu_4, CIDEr, ...)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    tokenizer: str = "ptb"  # "ptb" (Stanford PTBTokenizer, as pycocoevalcap) or "python" (no java)


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (pycocoevalcap's tokenizer, METEOR and SPICE)."""
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """A Python stand-in for ``PTBTokenizer -preserveLines -lowerCase`` followed by pycocoevalcap's
    punctuation filter: lowercase, words / contractions / punctuation split, punctuation dropped."""
    tokens = _TOKEN.findall(text.replace("\n", " ").lower())
    return " ".join(t for t in tokens if t not in _PUNCTUATIONS)


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    if not predictions:
        raise ValueError("caption metrics need at least one prediction.")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}.")


def _spice_blocker() -> str | None:
    """Why SPICE cannot run now, or None. Fetches CoreNLP as pycocoevalcap does when it is missing."""
    if not java_available():
        return "needs java (not found on PATH)"
    try:
        from pycocoevalcap.spice.get_stanford_models import get_stanford_models

        get_stanford_models()  # downloads Stanford CoreNLP 3.6.0 on first use; a no-op afterwards
    except Exception as err:  # offline, proxy, disk: the message says what happened
        return (
            f"Stanford CoreNLP 3.6.0 could not be fetched ({type(err).__name__}: {err}); pycocoevalcap's "
            "get_stanford_models() downloads it into pycocoevalcap/spice/lib on first use"
        )
    return None


def caption_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
) -> CaptionScores:
    """Score ``predictions`` (one caption each) against ``references`` (several captions each) with
    pycocoevalcap's scorers; ``metrics`` from :data:`CAPTION_METRICS` (``spice`` is opt-in)."""
    unknown = [m for m in metrics if m not in CAPTION_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric {unknown[0]!r}; choose from: {', '.join(CAPTION_METRICS)}.")
    _check_inputs(predictions, references)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise ImportError(
            "caption metrics need pycocoevalcap: pip install 'mllm[eval]' (or pip install pycocoevalcap)."
        ) from err

    ids = list(range(len(predictions)))
    gts = {i: [{"caption": str(c)} for c in references[i]] for i in ids}
    res = {i: [{"caption": str(predictions[i])}] for i in ids}
    skipped: dict[str, str] = {}
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        tokenizer_name = "ptb"
    else:
        gts_tok = {i: [simple_tokenize(c["caption"]) for c in caps] for i, caps in gts.items()}
        res_tok = {i: [simple_tokenize(c["caption"]) for c in caps] for i, caps in res.items()}
        tokenizer_name = "python"
    scorers: list[tuple[str, object]] = []
    for name in metrics:
        if name == "bleu":
            scorers.append((name, Bleu(4)))
        elif name == "rouge":
            scorers.append((name, Rouge()))
        elif name == "cider":
            scorers.append((name, Cider()))
        elif name == "meteor":
            if java_available():
                from pycocoevalcap.meteor.meteor import Meteor

                scorers.append((name, Meteor()))
            else:
                skipped["METEOR"] = "needs java (not found on PATH)"
        elif name == "spice":
            blocker = _spice_blocker()
            if blocker is None:
                from pycocoevalcap.spice.spice import Spice

                scorers.append((name, Spice()))
            else:
                skipped["SPICE"] = blocker
    scores: dict[str, float] = {}
    per_sample: dict[str, list[float]] = {}
    for name, scorer in scorers:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts to stdout
                corpus, each = scorer.compute_score(gts_tok, res_tok)  # type: ignore[attr-defined]
        except Exception as err:  # SPICE's Java 8 era code, a broken JVM: named, not zeroed
            if name != "spice":
                raise
            skipped["SPICE"] = f"SPICE failed to run ({type(err).__name__}: {err})"
            continue
        keys = _KEYS[name]
        if name == "bleu":  # lists of 4: corpus Bleu_n and per-sentence Bleu_n
            for n, key in enumerate(keys):
                scores[key] = float(corpus[n])
                per_sample[key] = [float(s) for s in each[n]]
        elif name == "spice":  # per-image dicts of {"All": {"f": ...}, ...}
            scores[keys[0]] = float(corpus)
            per_sample[keys[0]] = [float(s["All"]["f"]) for s in each]
        else:
            scores[keys[0]] = float(corpus)
            per_sample[keys[0]] = [float(s) for s in each]
    for metric, reason in skipped.items():
        logger.warning("caption metric %s skipped: %s", metric, reason)
    if tokenizer_name == "python":
        logger.warning(
            "java is not on PATH: captions were tokenised by mllm's Python stand-in for the PTB tokenizer, "
            "so Bleu/ROUGE_L/CIDEr may differ slightly from pycocoevalcap's official numbers."
        )
    return CaptionScores(scores, per_sample, skipped, tokenizer_name)


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
) -> dict[str, float]:
    """``{"Bleu_1": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ...}`` computed by
    pycocoevalcap (see :func:`caption_scores`); a metric that could not run is absent (and logged),
    never zero."""
    return caption_scores(predictions, references, metrics).scores
