"""Caption metrics equal pycocoevalcap called directly; without java the skipped metrics are named;
SPICE is opt-in and says why it cannot run; caption data in COCO, row and LLaVA form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap", reason="caption metrics need pycocoevalcap (pip install -e '.[eval]')")

import mllm.evaluation.caption_eval as cm  # noqa: E402
from mllm.evaluation import caption_metrics  # noqa: E402
from mllm.evaluation.loop import EvalOptions  # noqa: E402
from mllm.evaluation.tasks.caption import CaptionTask, load_caption_samples  # noqa: E402

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer and METEOR run in java, not on PATH"
)

PREDICTIONS = ["a man riding a horse on a beach.", "two dogs play in the snow", "a red bus", ""]
REFERENCES = [
    ["A man rides a horse along the beach.", "a person on a horse near the ocean"],
    ["Two dogs playing in snow.", "dogs in the snow", "two puppies run through snow"],
    ["A red double-decker bus on the street.", "a bus"],
    ["a cat asleep on a sofa", "the cat is sleeping"],  # an empty prediction scores, it does not crash
]


def _pycocoevalcap_directly(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """What pycocoevalcap.eval.COCOEvalCap.evaluate computes, without the COCO api objects."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": c} for c in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": p}] for i, p in enumerate(predictions)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    out: dict[str, float] = {}
    for scorer, names in [
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (Meteor(), ["METEOR"]),
        (Rouge(), ["ROUGE_L"]),
        (Cider(), ["CIDEr"]),
    ]:
        score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            out[name] = value
    return out


@needs_java
def test_caption_metrics_equal_pycocoevalcap_called_directly() -> None:
    ours = caption_metrics(PREDICTIONS, REFERENCES)
    theirs = _pycocoevalcap_directly(PREDICTIONS, REFERENCES)
    assert list(ours) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name
    assert 0.5 < ours["CIDEr"] < 3.0 and 0.0 < ours["METEOR"] < 1.0  # not zeros


@needs_java
def test_bleu_1_by_hand() -> None:
    # "a cat sits" vs "a cat sat": 2 of 3 unigrams match, same length (no brevity penalty) -> 2/3
    scores = caption_metrics(["a cat sits"], [["a cat sat"]], metrics=("bleu",))
    assert scores["Bleu_1"] == pytest.approx(2 / 3, abs=1e-6)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"}


def test_without_java_meteor_and_spice_are_skipped_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    result = cm.caption_scores(PREDICTIONS, REFERENCES, metrics=(*cm.DEFAULT_CAPTION_METRICS, "spice"))
    assert "METEOR" not in result.scores and "SPICE" not in result.scores  # never a silent zero
    assert result.skipped == {
        "METEOR": "needs java (not found on PATH)",
        "SPICE": "needs java (not found on PATH)",
    }
    assert result.tokenizer == "python"
    assert set(result.scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}


@needs_java
def test_python_tokenizer_agrees_with_ptb_on_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the PTB tokenizer only lowercases and drops punctuation, the no-java numbers are the same."""
    with_java = cm.caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu", "rouge", "cider")).scores
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    without = cm.caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu", "rouge", "cider")).scores
    assert without == pytest.approx(with_java, abs=1e-12)


def test_spice_is_opt_in_and_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.spice.get_stanford_models as stanford

    def offline() -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(stanford, "get_stanford_models", offline)
    monkeypatch.setattr(cm, "java_available", lambda: True)
    result = cm.caption_scores(["a cat"], [["a cat"]], metrics=("spice", "bleu"))
    assert "SPICE" not in result.scores and "Bleu_1" in result.scores
    assert (
        "Stanford CoreNLP" in result.skipped["SPICE"] and "network is unreachable" in result.skipped["SPICE"]
    )
    assert "SPICE" not in caption_metrics(["a cat"], [["a cat"]], metrics=("bleu",))  # not asked, not run
    with pytest.raises(ValueError, match="unknown caption metric 'bertscore'"):
        caption_metrics(["a"], [["a"]], metrics=("bertscore",))


def test_caption_data_in_coco_row_and_llava_form(tmp_path: Path) -> None:
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "b.png"},
            {"id": 3, "file_name": "c.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "a red square"},
            {"image_id": 2, "caption": "a blue circle"},
            {"image_id": 1, "caption": "red box"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    samples = load_caption_samples(str(tmp_path / "coco.json"))
    assert [(s.id, s.references) for s in samples] == [
        ("1", ("a red square", "red box")),
        ("2", ("a blue circle",)),
    ]
    assert samples[0].images == (str(tmp_path / "a.png"),)
    task, options = CaptionTask(), EvalOptions()
    assert task.prompt_turns(samples[0], "<image>", options)[-1].content == "<image>"  # nothing added
    asked = task.prompt_turns(samples[0], "<image>", EvalOptions(instruction="A short image caption:"))
    assert asked[-1].content == "<image>\nA short image caption:"

    rows = [{"id": "x", "image": "a.png", "captions": ["one", "two"]}, {"image": "b.png", "caption": "three"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_caption_samples(str(tmp_path / "rows.jsonl"), limit=1)
    assert [(s.id, s.references) for s in samples] == [("x", ("one", "two"))]

    def record(caption: str) -> dict:
        return {"id": "img1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]}  # fmt: skip

    (tmp_path / "llava.json").write_text(json.dumps([record("a red square"), record("red box")]))
    (sample,) = load_caption_samples(str(tmp_path / "llava.json"))
    assert sample.references == ("a red square", "red box")  # one sample, both references
    assert task.prompt_turns(sample, "<image>", options)[-1].content == "<image>\nDescribe the image."
