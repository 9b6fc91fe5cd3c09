"""Stage-level beam search: the cache is reused exactly, the image is encoded once, tags split over
tokens stop a candidate, and the bad-input cases end in a closed stage that the trace names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm.inference import ChatModel
from mllm.inference.stage_beam import DEFAULT_STAGES, Stage, StageBeamSearch, parse_verdict
from mllm.models import MllmForConditionalGeneration, MllmProcessor

QUESTION = "<image>\nwhat color is the circle?"


@pytest.fixture(scope="module")
def chat(tiny_components: dict[str, Path]) -> ChatModel:
    torch.manual_seed(0)
    vision, llm = tiny_components["clip-vision"], tiny_components["qwen2"]
    model = MllmForConditionalGeneration.from_components(vision, llm, connector="mlp").eval()
    processor = MllmProcessor.from_components(str(vision), str(llm), model.config.num_image_tokens)
    return ChatModel(model, processor, "chatml")


@pytest.fixture()
def image() -> Image.Image:
    return Image.new("RGB", (40, 32), (200, 30, 30))


def _search(chat: ChatModel, **kw) -> StageBeamSearch:
    kw = {"beams": 3, "seed": 0, "max_stage_tokens": 6, "max_judge_tokens": 5, **kw}
    return StageBeamSearch(chat, **kw)


# one-letter closing tags that random text writes soon: candidates of one stage stop at different
# lengths, so the kept row is cropped below the batch's length
SHORT_TAGS = tuple(Stage(n, "which is better?", open_tag="", close_tag=t) for n, t in zip("ABCD", "eaot"))


@pytest.mark.parametrize("stages", [DEFAULT_STAGES, SHORT_TAGS], ids=["llava-cot-tags", "short-tags"])
def test_cached_candidates_have_the_logits_of_a_full_recompute(
    chat: ChatModel, image: Image.Image, stages: tuple[Stage, ...]
) -> None:
    """Every candidate of every stage, sampled from the shared (expanded, cropped, extended) cache,
    gets the logits that one forward pass over the whole sequence from scratch gives."""
    search = _search(chat, selection="logprob", stages=stages, max_stage_tokens=10)
    result = search.run(QUESTION, [image], record_logits=True)
    pixel_values = chat.processor(text=["<image>"], images=[[image]])["pixel_values"]
    checked = 0
    for prefix, stage_logits, stage in zip(result.prefixes, result.logits, result.trace["stages"]):
        for candidate, cached in zip(stage["candidates"], stage_logits):
            full = torch.tensor([prefix + candidate["ids"]])
            with torch.inference_mode():
                fresh = chat.model(input_ids=full, pixel_values=pixel_values, use_cache=False).logits[0]
            positions = range(len(prefix) - 1, len(prefix) - 1 + len(candidate["ids"]))
            torch.testing.assert_close(cached, fresh[list(positions)].float(), atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == 4 * 3  # four stages, three candidates each
    if stages is DEFAULT_STAGES:  # long enough candidates to draft: drafts kept and cut short
        proposed, kept = result.trace["draft_tokens"].values()
        assert proposed > kept > 0  # the rejected positions are masked, then dropped from the cache
    if stages is SHORT_TAGS:
        lengths = {len(c["ids"]) for s in result.trace["stages"] for c in s["candidates"]}
        assert len(lengths) > 1, "all candidates had the same length: the crop was not exercised"
    assert len(result.prefixes[-1]) > len(result.prefixes[0])  # later stages start after accepted text


def test_the_vision_tower_runs_once_per_question(chat: ChatModel, image: Image.Image) -> None:
    calls = []
    hook = chat.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        search = _search(chat, beams=4)
        first = search.run(QUESTION, [image])
        assert len(calls) == 1
        search.run("<image>\nand the square?", [image])
        assert len(calls) == 2
    finally:
        hook.remove()
    assert first.trace["judgements"] == 4 * 3  # three knock-out rounds per stage, each a judge with the image
    assert first.trace["vision_calls"] == 1


def test_a_tag_split_over_tokens_stops_the_candidate(chat: ChatModel, image: Image.Image) -> None:
    """A scripted sampler writes `ok </SUMMARY> tail` token by token: the candidate stops on the
    token that completes the tag, however many tokens the tag took."""
    tokenizer = chat.processor.tokenizer
    script = tokenizer.encode("ok </SUMMARY> and more text after", add_special_tokens=False)
    tag_ids = tokenizer.encode("</SUMMARY>", add_special_tokens=False)
    assert len(tag_ids) > 2, "the tag must take several tokens for this test to mean anything"
    search = _search(  # drafts off: the scripted sampler stands in for every token
        chat, beams=2, stages=DEFAULT_STAGES[:1], selection="logprob", max_stage_tokens=30, drafts=False
    )
    steps = iter(script)
    search._sample = lambda logits: torch.full((logits.shape[0],), next(steps))  # noqa: SLF001
    result = search.run(QUESTION, [image])
    [stage] = result.trace["stages"]
    written = tokenizer.decode(stage["candidates"][0]["ids"])
    assert stage["closed_by"] == "tag"
    assert "</SUMMARY>" in written  # the tag is complete on the candidate's last token, not before
    assert "</SUMMARY>" not in tokenizer.decode(stage["candidates"][0]["ids"][:-1])
    assert "and more" not in written
    assert stage["text"].rstrip().endswith("</SUMMARY>")
    assert result.answer.count("</SUMMARY>") == 1  # the search did not append a second tag


def test_stop_check_decodes_only_the_last_tokens(chat: ChatModel) -> None:
    search = _search(chat)
    tokenizer = chat.processor.tokenizer
    long = tokenizer.encode("word " * 200 + "</CAPTION>", add_special_tokens=False)
    decoded = []
    original = tokenizer.decode

    def spy(ids, **kw):
        decoded.append(len(ids))
        return original(ids, **kw)

    tokenizer.decode = spy
    try:
        assert search._stopped(long, ["</CAPTION>"])  # noqa: SLF001
        assert not search._stopped(long[:-1], ["</CAPTION>"])  # noqa: SLF001
    finally:
        del tokenizer.decode
    assert max(decoded) <= len("</CAPTION>")


def test_untrained_model_never_closes_a_tag_and_each_stage_is_closed(
    chat: ChatModel, image: Image.Image
) -> None:
    """The random model writes no tags: every candidate reaches the token limit, the search closes
    each stage with its tag, the trace says so, and the judge's answers (naming no response) fall
    back to log-probability, counted."""
    result = _search(chat).run(QUESTION, [image])
    trace = json.loads(json.dumps(result.trace))  # json-serialisable
    assert [s["name"] for s in trace["stages"]] == ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
    for stage in trace["stages"]:
        assert all(c["closed_by"] in ("limit", "eos") for c in stage["candidates"])
        assert "closed by the search" in stage["note"]
        for judgement in stage["judgements"]:
            assert judgement["fallback"] is True
            champion, challenger = judgement["pair"]
            lp = {i: stage["candidates"][i]["mean_logprob"] for i in judgement["pair"]}
            assert judgement["winner"] == (challenger if lp[challenger] > lp[champion] else champion)
    assert trace["judge_fallbacks"] == trace["judgements"] == 8
    for tag in ("</SUMMARY>", "</CAPTION>", "</REASONING>", "</CONCLUSION>"):
        assert tag in result.answer
    assert isinstance(result.conclusion, str)


def test_one_beam_is_plain_sampling(chat: ChatModel, image: Image.Image) -> None:
    """N=1: no judge; at temperature 0 the first stage is the greedy continuation of the prompt."""
    result = _search(chat, beams=1, temperature=0.0).run(QUESTION, [image])
    assert result.trace["judgements"] == 0
    assert all(len(s["candidates"]) == 1 and "judgements" not in s for s in result.trace["stages"])
    prompt, images = chat.prompt(QUESTION, [image])
    inputs = chat.processor(text=[prompt], images=[images])
    with torch.inference_mode():
        greedy = chat.model.generate(
            **inputs, max_new_tokens=6, do_sample=False, eos_token_id=chat.stop_token_ids
        )
    first = result.trace["stages"][0]["candidates"][0]["ids"]
    assert first == greedy[0, inputs["input_ids"].shape[1] :].tolist()[: len(first)]


def test_selection_by_logprob_and_by_a_scoring_function(chat: ChatModel, image: Image.Image) -> None:
    by_logprob = _search(chat, selection="logprob").run(QUESTION, [image]).trace
    for stage in by_logprob["stages"]:
        scores = [c["mean_logprob"] for c in stage["candidates"]]
        assert stage["winner"] == scores.index(max(scores))
    shortest = _search(chat, selection=lambda name, text, context: -len(text)).run(QUESTION, [image]).trace
    for stage in shortest["stages"]:
        lengths = [len(c["text"]) for c in stage["candidates"]]
        assert lengths[stage["winner"]] == min(lengths)
    assert by_logprob["judgements"] == shortest["judgements"] == 0


def test_custom_stages_and_baselines(chat: ChatModel, image: Image.Image) -> None:
    two = (Stage("PLAN", "which plan is better?"), Stage("ANSWER", "which answer is better?"))
    trace = _search(chat, stages=two, selection="logprob").run(QUESTION, [image]).trace
    assert [s["name"] for s in trace["stages"]] == ["PLAN", "ANSWER"]
    best = _search(chat, method="best_of_n").run(QUESTION, [image]).trace
    assert len(best["stages"]) == 1 and best["judgements"] == 2
    sentence = _search(chat, method="sentence", max_sentences=2).run(QUESTION, [image]).trace
    assert 1 <= len(sentence["stages"]) <= 2


def test_text_only_question(chat: ChatModel) -> None:
    result = _search(chat, beams=2).run("what is two plus two?")
    assert result.trace["vision_calls"] == 0 and result.trace["judgements"] == 4


def test_bad_arguments(chat: ChatModel) -> None:
    with pytest.raises(ValueError, match="beams must be >= 1"):
        StageBeamSearch(chat, beams=0)
    with pytest.raises(ValueError, match="choose one of: stage, best_of_n, sentence"):
        StageBeamSearch(chat, method="tree")
    with pytest.raises(ValueError, match="selection `vote`"):
        StageBeamSearch(chat, selection="vote")


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Since it is clearer, I choose response 2.", 1),
        ("Since [reason], I choose response [1].", 0),
        ("response 1 is better", 0),
        ("both response 1 and response 2 are fine", None),
        ("I like neither", None),
    ],
)
def test_parse_verdict(text: str, verdict: int | None) -> None:
    assert parse_verdict(text) == verdict


def test_judges_batched_in_a_bracket_answer_as_judged_alone(chat: ChatModel, image: Image.Image) -> None:
    """Judge prompts of unequal length decoded as one left-padded batch give each the answer it
    gets alone, and a bracket knock-out makes the same N-1 judgements."""
    search = _search(chat, max_judge_tokens=8, drafts=False)  # one token per decode step
    search._images, search._n_images = [image], 1  # noqa: SLF001 -- the layout run() sets
    question = "what color is the circle?"
    prompts = [
        search._judge_text(search._judge_prompt(s.judge, s.recall, question, "", pair))  # noqa: SLF001
        for s, pair in zip(DEFAULT_STAGES, [("a red one", "blue"), ("it is a small green square", "no")])
    ]
    batch = chat.processor(text=[prompts[0]], images=[[image]])
    seen: list[torch.Tensor] = []
    forward = search._forward  # noqa: SLF001

    def spy(ids, *args, **kwargs):
        out = forward(ids, *args, **kwargs)
        if ids.shape[1] == 1:  # decode steps only
            seen.append(out)
        return out

    search._forward = spy  # noqa: SLF001
    with torch.inference_mode():
        features = chat.model.get_image_features(batch["pixel_values"])
        alone = []
        steps_alone = []
        for p in prompts:
            seen.clear()
            alone.append(search._judge(p, features, []))  # noqa: SLF001
            steps_alone.append(torch.cat(seen))  # [steps, V]
        seen.clear()
        together = search._judge_many(prompts, features, [])  # noqa: SLF001
        steps_together = torch.stack(seen, dim=1)  # [B, steps, V]
    assert len(search._ids(prompts[0])) != len(search._ids(prompts[1]))  # noqa: SLF001
    assert together == alone and all(text for _, text in alone)
    for row, single in enumerate(steps_alone):  # the padded, masked batch computes each row's logits
        torch.testing.assert_close(steps_together[row, : len(single)], single, atol=1e-4, rtol=1e-4)
    trace = _search(chat, beams=4, knockout="bracket").run(QUESTION, [image]).trace
    assert trace["judgements"] == 4 * 3
    assert [j["pair"] for j in trace["stages"][0]["judgements"]][:2] == [[0, 1], [2, 3]]


def test_speculative_knockout_decides_as_the_bracket_from_every_pair_judged_at_once(
    chat: ChatModel, image: Image.Image
) -> None:
    """Greedy judges give each pair the verdict it gets in the bracket, so judging every pair in one
    batch keeps the bracket's winners; the trace keeps its N-1 judgements and counts the others."""
    bracket = _search(chat, beams=4, knockout="bracket", max_judge_tokens=8).run(QUESTION, [image])
    ahead = _search(chat, beams=4, knockout="speculative", max_judge_tokens=8).run(QUESTION, [image])
    assert ahead.answer == bracket.answer
    for fast, slow in zip(ahead.trace["stages"], bracket.trace["stages"]):
        assert fast["winner"] == slow["winner"]
        assert [j["pair"] for j in fast["judgements"]] == [j["pair"] for j in slow["judgements"]]
        assert [j["answer"] for j in fast["judgements"]] == [j["answer"] for j in slow["judgements"]]
    assert ahead.trace["judgements"] == bracket.trace["judgements"] == 4 * 3
    assert ahead.trace["speculative_judgements"] == 4 * (6 - 3)
    assert bracket.trace["speculative_judgements"] == 0


def test_drafts_change_no_greedy_answer_and_a_repeated_judge_answer_takes_one_forward(
    chat: ChatModel, image: Image.Image
) -> None:
    """A draft is checked against the model's own predictions, so a whole greedy search (candidates
    and judges) gives the same candidates and judgements with drafts as without; a judge answer
    seen before is decoded in one forward."""
    kw = {"beams": 4, "knockout": "bracket", "max_judge_tokens": 12, "max_stage_tokens": 12, "temperature": 0}
    slow = _search(chat, drafts=False, **kw).run(QUESTION, [image])
    fast = _search(chat, **kw).run(QUESTION, [image])
    assert fast.answer == slow.answer
    for a, b in zip(fast.trace["stages"], slow.trace["stages"]):
        assert [c["ids"] for c in a["candidates"]] == [c["ids"] for c in b["candidates"]]
        assert [j["answer"] for j in a["judgements"]] == [j["answer"] for j in b["judgements"]]
    proposed, kept = fast.trace["draft_tokens"].values()
    assert proposed > kept > 0  # drafts were both taken and cut short, and nothing moved
    assert slow.trace["draft_tokens"] == {"proposed": 0, "kept": 0}
    assert fast.trace["forwards"] < slow.trace["forwards"]

    search = _search(chat, max_judge_tokens=12)
    search._images, search._n_images = [image], 1  # noqa: SLF001 -- the layout run() sets
    stage = DEFAULT_STAGES[1]
    prompt = search._judge_text(
        search._judge_prompt(stage.judge, stage.recall, "which color?", "", ["red", "blue"])
    )  # noqa: SLF001
    batch = chat.processor(text=[prompt], images=[[image]])
    with torch.inference_mode():
        features = chat.model.get_image_features(batch["pixel_values"])
        first = search._judge(prompt, features, [])  # noqa: SLF001
        forwards = search.forwards
        again = search._judge(prompt, features, [])  # noqa: SLF001
    length = len(search._judge_history[-1])  # noqa: SLF001
    assert again == first and length > 2
    assert forwards == 1 + (length - 1)  # prefill, then one decode step per further token
    assert search.forwards - forwards == 1 + 1  # prefill, then the whole draft checked at once


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 0.9)])
def test_a_checked_draft_token_is_a_sample_of_the_model_distribution(
    chat: ChatModel, temperature: float, top_p: float
) -> None:
    """Kept with the probability the model gives it, else replaced by a draw without it: the token
    returned has the model's own (tempered, nucleus-cut) distribution, whatever the draft."""
    search = _search(chat, temperature=temperature, top_p=top_p, seed=1)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    target = search._probs(logits)  # noqa: SLF001
    draws = 20000
    for draft in (0, 3):  # the likeliest token, and an unlikely one
        counts = torch.zeros_like(target)
        for _ in range(draws):
            counts[search.check_draft(logits, draft)[1]] += 1
        torch.testing.assert_close(counts / draws, target, atol=0.015, rtol=0)
    if top_p < 1:
        assert target[-1] == 0  # the nucleus cut is applied, so the check is not vacuous


def test_forget_drafts_makes_a_seeded_question_independent_of_the_ones_before(
    chat: ChatModel, image: Image.Image
) -> None:
    """Drafts from earlier questions change how many random draws a question takes; `mllm eval`
    forgets them before each seeded question, so a resumed run samples what a whole one did."""
    alone = _search(chat, beams=2, seed=3).run(QUESTION, [image]).answer
    search = _search(chat, beams=2, seed=0)
    search.run("<image>\nwhich shape is red?", [image])  # leaves drafts behind
    search.generator = torch.Generator().manual_seed(3)
    search.forget_drafts()
    assert search.run(QUESTION, [image]).answer == alone
