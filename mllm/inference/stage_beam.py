"""Stage-level beam search for structured chain-of-thought (LLaVA-CoT, Xu et al. 2024,
https://arxiv.org/abs/2411.10440, section 3.3; reference code: PKU-YuanGroup/LLaVA-CoT
``inference/demo/simple_inference.py``).

The answer is written in tagged stages (``<SUMMARY>``, ``<CAPTION>``, ``<REASONING>``,
``<CONCLUSION>`` by default). For each stage N candidates are sampled until they close the stage's
tag, one is kept -- by LLaVA-CoT's pairwise knock-out judged by the model itself (the winner of two
meets the next candidate), by mean token log-probability, or by a user's scoring function -- and
appended to the answer before the next stage. ``method="best_of_n"`` (whole answers, judged the
same way) and ``method="sentence"`` (sentence-level beam search) are the paper's baselines.

Unlike the reference, which calls ``generate`` once per candidate and per judgement (re-encoding
the image and re-prefilling the whole accepted prefix each time, and decoding the whole sequence
at every step to look for the tag), here:

- the image is encoded once per question (``get_image_features``), its features reused for every
  prefill, judges included;
- the accepted prefix lives in one KV cache (`transformers.DynamicCache`), expanded
  (``batch_repeat_interleave``) for the N candidates, which decode as one batch; the winner's row
  is kept (``batch_select_indices`` + ``crop``) and extended, never recomputed;
- a judge prompt reuses the cache of its longest common token prefix with what was already
  computed (the chat header and the image; the judge text of the stage from the second judgement on);
- a candidate stops when the tag shows in the decoded text of its last ``len(tag)`` tokens only,
  so a tag split over several tokens still stops it, at a cost independent of the answer length.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_STAGES",
    "JUDGE_ALL",
    "JUDGE_SENTENCE",
    "METHODS",
    "SearchResult",
    "Stage",
    "StageBeamSearch",
    "judge_prompt",
    "parse_verdict",
    "stage_text",
]

METHODS = ("stage", "best_of_n", "sentence")
SELECTIONS = ("judge", "logprob")
KNOCKOUTS = ("sequential", "bracket", "speculative")
"""The winner meets the next / rounds of pairs, each round judged as one batch / the bracket's
decisions from every pair judged at once (one batched judge decode per stage)."""
Scorer = Callable[[str, str, dict[str, Any]], float]
"""``(stage name, candidate text, context) -> score``; the highest score wins. ``context`` holds
``question`` and ``answer_so_far``."""

# The judge's output format and the pairwise prompt follow LLaVA-CoT's `judge()` (simple_inference.py).
_FORMAT = (
    " Please strictly follow the following format requirements when outputting, and don't have any other "
    'unnecessary words.\n\nOutput format: "Since [reason], I choose response [1/2]."'
)


@dataclass(frozen=True)
class Stage:
    """One tagged stage: its tags and the judge's instruction for comparing two of its candidates."""

    name: str  # e.g. "SUMMARY"; the tags are <NAME> and </NAME> unless given
    judge: str  # what the judge is asked to decide
    recall: str = ""  # the reminder after the two responses
    hint_from: tuple[str, ...] = ()  # earlier stages whose accepted text the judge sees as a hint
    open_tag: str = ""
    close_tag: str = ""

    def __post_init__(self) -> None:
        if not self.open_tag:
            object.__setattr__(self, "open_tag", f"<{self.name}>")
        if not self.close_tag:
            object.__setattr__(self, "close_tag", f"</{self.name}>")


_J = "Now you act as a judge, helping me determine which of the two texts I provide "
DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage(
        "SUMMARY",
        _J + "better provides a summary of what it should do to solve the question. The summary should focus "
        "on outlining the main approach instead of stating specific analytical reasoning or math formula.",
        "Please note that a better summary should focus on outlining the main approach instead of stating "
        "specific analytical reasoning or math formula.",
    ),
    Stage(
        "CAPTION",
        _J + "better summarizes the information in the image related to the question, and has fewer errors. "
        "It is essential that the captions are as thorough as possible while remaining accurate, capturing as "
        "many details as possible rather than providing only general commentary.",
        "Please note that a better caption should be as thorough as possible while remaining accurate, "
        "capturing as many details as possible rather than providing only general commentary.",
    ),
    Stage(
        "REASONING",
        _J + "better explains the reasoning process to solve the question, and has fewer errors. Begin by "
        "thoroughly reviewing the question, followed by an in-depth examination of each answer individually, "
        "noting any differences. Subsequently, analyze these differences to determine which response "
        "demonstrates stronger reasoning and provide a clear conclusion.",
        "Begin by thoroughly reviewing the question, followed by an in-depth examination of each answer "
        "individually, noting any differences. Subsequently, analyze these differences to determine which "
        "response demonstrates stronger reasoning and provide a clear conclusion.",
        hint_from=("CAPTION",),
    ),
    Stage(
        "CONCLUSION",
        _J + "offers a more effective conclusion to the question. The conclusion should align with the "
        "reasoning presented in the hint. The conclusion should never refuse to answer the question.",
        "Please note that a better conclusion should align with the reasoning presented in the hint. The "
        "conclusion should never refuse to answer the question.",
        hint_from=("CAPTION", "REASONING"),
    ),
)
JUDGE_ALL = _J + "better answers the question."  # best-of-N
JUDGE_SENTENCE = _J + "is a better next sentence for the answer to the question."  # sentence level

_VERDICT = re.compile(r"choose\s+response\s*\[?\s*([12])\b", re.IGNORECASE)
_MENTION = re.compile(r"response\s*\[?\s*([12])\b", re.IGNORECASE)


def parse_verdict(text: str) -> int | None:
    """0 or 1 for a judge answer choosing response 1 or 2 ("I choose response 2"), else None (also
    when it names both without choosing)."""
    found = _VERDICT.search(text)
    if found:
        return int(found.group(1)) - 1
    named = {m.group(1) for m in _MENTION.finditer(text)}
    return int(named.pop()) - 1 if len(named) == 1 else None


@dataclass
class _Candidate:
    tokens: list[int]  # sampled tokens (an EOS that ended the candidate is not kept)
    logprob_sum: float = 0.0
    closed_by: str = "limit"  # "tag" | "eos" | "limit"
    logits: list[torch.Tensor] = field(default_factory=list)  # with record_logits: [V] per token

    @property
    def mean_logprob(self) -> float:
        return self.logprob_sum / max(1, len(self.tokens))


@dataclass
class _State:
    """A sequence whose KV cache covers every token in ``ids``; ``logits`` [V] predict the next one."""

    ids: list[int]
    cache: Any
    logits: torch.Tensor


@dataclass
class SearchResult:
    answer: str  # the whole tagged answer
    conclusion: str  # the text inside the last stage's tags ("" when absent)
    trace: dict[str, Any]  # json-serialisable: every candidate, judgement and winner per stage
    sequence: list[int] = field(default_factory=list)  # prompt + answer token ids
    logits: list[list[torch.Tensor]] = field(default_factory=list)  # with record_logits: [stage][cand] [T, V]
    prefixes: list[list[int]] = field(default_factory=list)  # with record_logits: ids before each stage


class _Lookup:
    """Prompt-lookup drafts (Saxena 2023; transformers' ``prompt_lookup_num_tokens``, which works
    inside ``generate`` only): the tokens that followed the last 3, 2 or 1 tokens of a candidate
    where they occurred before -- in the candidate itself, in ``history`` (latest first), or in
    the ``prefix`` it continues (prompt and accepted stages, indexed once)."""

    def __init__(self, prefix: Sequence[int], history: Sequence[list[int]], stop_at: int) -> None:
        self.stop_at = stop_at  # a draft ends before this token (the image placeholder)
        self.prefix = list(prefix)
        self.history = list(reversed(history))
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> end of its last occurrence in prefix
        for n in (1, 2, 3):
            for end in range(n, len(self.prefix)):  # an occurrence with at least one token after it
                self.index[tuple(self.prefix[end - n : end])] = end

    def draft(self, tokens: list[int], budget: int) -> list[int]:
        found = self._find(tokens, budget)
        return found[: found.index(self.stop_at)] if self.stop_at in found else found

    def _find(self, tokens: list[int], budget: int) -> list[int]:
        if budget <= 0 or not tokens:
            return []
        for n in (3, 2, 1):
            if len(tokens) < n:
                continue
            key = tokens[-n:]
            for seq in (tokens, *self.history):  # the candidate itself, then the latest texts
                for end in range(len(seq) - 1, n - 1, -1):  # not the candidate's own last tokens
                    if seq[end - n : end] == key:
                        return seq[end : end + budget]
            end = self.index.get(tuple(key))
            if end is not None:
                return [*self.prefix[end:], *tokens][:budget]
        return []


def _keep_fed(mask: torch.Tensor, positions: list[int], row: int, span: int, fed: int) -> None:
    """``row`` keeps the first ``fed`` positions of the block of ``span`` just fed: the rest (a
    rejected draft, fillers) is masked out, and its next block starts after the kept ones."""
    mask[row, mask.shape[1] - span + fed :] = 0
    positions[row] += fed


def _crop_to(cache: Any, length: int) -> None:
    extra = int(cache.get_seq_length()) - length
    if extra > 0:
        cache.crop(-extra)  # negative: remove that many tokens from the end


class StageBeamSearch:
    """Stage-level beam search on a `mllm.inference.ChatModel` (or ``model``, ``processor``,
    ``template``): ``run(question, images) -> SearchResult``.

    ``beams`` candidates per stage (1 = plain sampling, no judge); ``selection`` is ``"judge"``
    (LLaVA-CoT's pairwise knock-out), ``"logprob"`` (mean token log-probability) or a `Scorer`;
    ``method`` is ``"stage"``, ``"best_of_n"`` or ``"sentence"``. Candidates are sampled with
    ``temperature`` / ``top_p`` (LLaVA-CoT: 0.6 / 0.9), at most ``max_stage_tokens`` each; judges
    decode greedily, at most ``max_judge_tokens``. ``knockout="sequential"`` lets the winner of
    each judgement meet the next candidate; ``"bracket"`` judges rounds of pairs ((0, 1), (2, 3),
    then their winners), each round's judges decoded as one batch: the same N-1 judgements (LLaVA-CoT's
    reference pairs candidates at random), fewer sequential decodes. ``"speculative"`` makes the
    bracket's decisions from every pair judged in one batch (N(N-1)/2 judge prompts, a single judge
    decode per stage): the judges are greedy, so each pair's verdict is the one the bracket would get,
    and the trace keeps the N-1 it used (``speculative_judgements`` counts the others).
    ``drafts`` (default on) decodes several tokens per forward where it can: each forward also
    checks a draft of the next tokens -- for a judge, from earlier judge answers (kept when they
    are the model's greedy choice); for a candidate, from its own sequence or earlier accepted
    texts of the stage, up to ``max_draft_tokens`` (kept by speculative sampling, `check_draft`).
    The answers are samples of the same distributions either way (greedy judges: the same answers).
    """

    def __init__(
        self,
        chat: Any,
        *,
        beams: int = 2,
        stages: Sequence[Stage] = DEFAULT_STAGES,
        selection: str | Scorer = "judge",
        method: str = "stage",
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_stage_tokens: int = 128,
        max_judge_tokens: int = 48,
        max_sentences: int = 32,
        seed: int | None = None,
        knockout: str = "sequential",
        drafts: bool = True,
        max_draft_tokens: int = 8,
    ) -> None:
        if beams < 1:
            raise ValueError(f"beams must be >= 1, got {beams}.")
        if method not in METHODS:
            raise ValueError(f"method `{method}` is not supported; choose one of: {', '.join(METHODS)}.")
        if not callable(selection) and selection not in SELECTIONS:
            raise ValueError(
                f"selection `{selection}` is not supported; choose one of: {', '.join(SELECTIONS)} or a function."
            )
        if not stages:
            raise ValueError("stages must name at least one stage.")
        if knockout not in KNOCKOUTS:
            raise ValueError(
                f"knockout `{knockout}` is not supported; choose one of: {', '.join(KNOCKOUTS)}."
            )
        self.knockout = knockout
        self.drafts = drafts
        self.max_draft_tokens = max_draft_tokens
        self.draft_memory = 32  # earlier judge answers / accepted stage texts kept for drafts
        self._judge_history: list[list[int]] = []  # across questions
        self._stage_history: dict[tuple[str, ...], list[list[int]]] = {}
        self.chat = chat
        self.model = chat.model
        self.processor = chat.processor
        self.tokenizer = chat.processor.tokenizer
        self.beams = beams
        self.stages = tuple(stages)
        self.selection = selection
        self.method = method
        self.temperature = temperature
        self.top_p = top_p
        self.max_stage_tokens = max_stage_tokens
        self.max_judge_tokens = max_judge_tokens
        self.max_sentences = max_sentences
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.base = base
        self.image_token_id = base.config.image_token_id
        self.stop_ids = set(chat.stop_token_ids)
        eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
        self.stop_ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
        import inspect

        params = inspect.signature(base.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: `cache`
        self.tokens_computed = 0  # token positions run through the LLM, all batches together
        self.forwards = 0  # LLM forward calls (prefills and decode steps) of the last run
        self.drafted = self.draft_kept = 0  # draft tokens proposed / kept, candidates and judges, last run
        self.vision_calls = 0
        self.beams_judged = 0  # judgements of the last run
        self.judge_fallbacks = 0  # of which the verdict fell back to log-probability
        self.speculative_judged = 0  # judgements computed ahead (knockout="speculative") and not used
        self._images: list[Any] = []  # the question's images (the judge prompts show them too)
        self._n_images = 0

    def forget_drafts(self) -> None:
        """Drop the earlier judge answers and accepted stage texts that drafts come from, so that a
        seeded run of one question draws the same samples whatever questions came before it."""
        self._judge_history.clear()
        self._stage_history.clear()

    # -- model steps ----------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return next(self.base.parameters()).device

    def _forward(
        self,
        ids: torch.Tensor,
        cache: Any,
        features: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> torch.Tensor:
        """Run ``ids`` [B, T] after ``cache`` (updated in place); returns the last logits [B, V]
        (with ``keep``, those of the last ``keep`` positions, [B, keep, V]). Rows of unequal
        length pass ``attention_mask`` [B, T_cache + T] and ``position_ids`` [B, T]."""
        embeds = self.base.get_input_embeddings()(ids)  # [B, T, D_llm]
        slots = ids == self.image_token_id
        if bool(slots.any()):
            n = int(slots.sum()) // features.shape[1]  # the image runs in `ids` are the last n images
            embeds = self.base.merge_image_features(ids, embeds, features[features.shape[0] - n :])
        out = self.base.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=keep or 1,
            **{self._cache_kw: cache},
        )
        self.tokens_computed += ids.numel()
        self.forwards += 1
        return out.logits[:, -1].float() if keep is None else out.logits[:, -keep:].float()

    def _extend(self, state: _State, new: Sequence[int], features: torch.Tensor | None) -> _State:
        """``state`` followed by ``new`` tokens (in place: the cache grows)."""
        if not new:
            return state
        ids = torch.tensor([list(new)], device=self._device)
        logits = self._forward(ids, state.cache, features)[0]
        return _State([*state.ids, *new], state.cache, logits)

    def _prefill(self, ids: list[int], features: torch.Tensor | None, known: Sequence[_State]) -> _State:
        """A state for ``ids`` that starts from the longest common prefix with a ``known`` state."""
        from transformers import DynamicCache

        best, length = None, 0
        for state in known:
            common = 0
            for a, b in zip(state.ids, ids):
                if a != b:
                    break
                common += 1
            common = min(common, len(ids) - 1)  # at least one token to run, for the logits
            if common > length:
                best, length = state, common
        if best is None:
            return self._extend(_State([], DynamicCache(), torch.empty(0)), ids, features)
        cache = copy.deepcopy(best.cache)
        _crop_to(cache, length)
        return self._extend(_State(ids[:length], cache, torch.empty(0)), ids[length:], features)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] -> the sampling distribution: softmax at ``temperature``, cut to ``top_p``."""
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return probs / probs.sum(-1, keepdim=True)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] -> [B]: greedy at temperature 0, else nucleus sampling."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = self._probs(logits)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)

    def check_draft(self, logits: torch.Tensor, draft: int) -> tuple[bool, int]:
        """Speculative sampling against a draft that proposes one token (Leviathan et al. 2023,
        Chen et al. 2023, with the draft distribution a point mass): ``draft`` is kept with the
        probability the model gives it (greedy: when it is the argmax); else a token is drawn from
        the model's distribution without it. Either way the token returned is a sample of the
        model's own distribution ``logits`` [V]. Returns (kept, token)."""
        if self.temperature <= 0:
            best = int(logits.argmax())
            return best == draft, best
        probs = self._probs(logits).cpu()
        if float(torch.rand((), generator=self.generator)) < float(probs[draft]):
            return True, draft
        probs[draft] = 0.0
        return False, int(torch.multinomial(probs, 1, generator=self.generator))

    def _stopped(self, tokens: list[int], stops: Sequence[str]) -> bool:
        """Whether a stop string shows in the last tokens: a string of L characters spans at most L
        tokens (each decodes to one character or more), so only the last L are decoded."""
        for stop in stops:
            tail = self.tokenizer.decode(tokens[-len(stop) :], skip_special_tokens=False)
            if stop in tail:
                return True
        return False

    def sample_candidates(
        self,
        state: _State,
        n: int,
        stops: Sequence[str],
        max_tokens: int,
        features: torch.Tensor | None,
        record_logits: bool = False,
        history: Sequence[list[int]] = (),
    ) -> tuple[list[_Candidate], Any, torch.Tensor]:
        """N candidates after ``state``, decoded as one batch from a copy of its cache expanded N
        times; each stops at a stop string, EOS / end of turn, or ``max_tokens``. Returns them, the
        batch cache (row i holds candidate i) and its mask [N, T] (0 at rejected draft positions).

        With ``drafts``, each forward also checks up to ``max_draft_tokens`` proposed tokens per
        row -- what followed the row's last tokens in its own sequence (the prompt, the accepted
        stages, the candidate so far) or in ``history`` (earlier accepted texts of this stage) --
        by `check_draft`, so every token is still a sample of the model's distribution."""
        cache = copy.deepcopy(state.cache)
        if n > 1:
            cache.batch_repeat_interleave(n)
        device = self._device
        start = len(state.ids)
        mask = torch.ones(n, start, dtype=torch.long, device=device)
        positions = [start] * n  # the position of each row's last token, which is not fed yet
        lookup = _Lookup(state.ids, history, self.image_token_id)
        candidates = [_Candidate([]) for _ in range(n)]

        def take(row: int, token: int, logits: torch.Tensor) -> bool:
            """Append ``token`` (sampled from ``logits`` [V]); False when the candidate is over."""
            candidate = candidates[row]
            if token in self.stop_ids:
                candidate.closed_by = "eos"
                return False
            candidate.tokens.append(token)
            candidate.logprob_sum += float(torch.log_softmax(logits, dim=-1)[token])
            if record_logits:
                candidate.logits.append(logits.detach().cpu())
            if stops and self._stopped(candidate.tokens, stops):
                candidate.closed_by = "tag"
                return False
            return len(candidate.tokens) < max_tokens

        first = self._sample(state.logits.unsqueeze(0).expand(n, -1))  # [N]
        running = [row for row in range(n) if take(row, int(first[row]), state.logits)]
        while running:
            drafts = {
                row: lookup.draft(
                    candidates[row].tokens,
                    min(self.max_draft_tokens, max_tokens - len(candidates[row].tokens)),
                )
                if self.drafts
                else []
                for row in running
            }
            blocks = [
                [candidates[row].tokens[-1] if candidates[row].tokens else 0, *drafts.get(row, [])]
                for row in range(n)
            ]
            logits, mask = self._feed_blocks(blocks, cache, features, mask, positions)  # [N, span, V]
            after: dict[int, int] = {}  # row -> the position whose logits give its next token
            for row in list(running):
                draft, fed, alive = drafts[row], 1, True
                for i, proposed in enumerate(draft):
                    kept, token = self.check_draft(logits[row, i], proposed)
                    self.drafted += 1
                    self.draft_kept += kept
                    alive = take(row, token, logits[row, i])
                    if not kept:
                        break  # a token drawn in its place, fed with the next block
                    fed += 1
                    if not alive:
                        break
                else:  # every draft token kept (or none proposed): the next one is sampled below
                    if alive:
                        after[row] = len(draft)
                _keep_fed(mask, positions, row, logits.shape[1], fed)
                if not alive:
                    running.remove(row)
            if after:  # one batched draw for the rows whose drafts were all kept
                rows = list(after)
                last = logits[rows, [after[r] for r in rows]]  # [R, V]
                for row, token, row_logits in zip(rows, self._sample(last).tolist(), last):
                    if not take(row, token, row_logits):
                        running.remove(row)
        return candidates, cache, mask

    def _feed_blocks(
        self, blocks: list[list[int]], cache: Any, features: Any, mask: torch.Tensor, positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run each row's block (its last token, not yet fed, then a draft) after ``cache``, the rows
        filled up to one width by repeating their last token; ``positions`` [B] are where the blocks
        start. Returns the logits of every block position [B, span, V] and ``mask`` grown by span
        (`_keep_fed` then masks what each row does not keep)."""
        span = max(len(b) for b in blocks)
        ids = torch.tensor([b + [b[-1]] * (span - len(b)) for b in blocks], device=self._device)
        mask = torch.cat([mask, torch.ones(len(blocks), span, dtype=mask.dtype, device=mask.device)], dim=1)
        position_ids = torch.tensor([[p + i for i in range(span)] for p in positions], device=self._device)
        return self._forward(ids, cache, features, mask, position_ids, keep=span), mask

    def _accept(
        self,
        state: _State,
        cache: Any,
        mask: torch.Tensor,
        row: int,
        candidate: _Candidate,
        close: str,
        n: int,
        features: Any,
    ) -> _State:
        """The state after the winner: its row of the batch cache (the tokens it fed, without the
        rejected draft positions), its last token, and ``close`` when the candidate did not close
        the stage itself."""
        if n > 1:
            cache.batch_select_indices(torch.tensor([row], device=self._device))
        keep = mask[row].nonzero()[:, 0]
        if len(keep) < mask.shape[1]:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        fed = len(candidate.tokens) - 1 if candidate.tokens else 0
        _crop_to(cache, len(state.ids) + fed)
        kept = _State([*state.ids, *candidate.tokens[:fed]], cache, state.logits)
        extra = candidate.tokens[fed:]
        if candidate.closed_by != "tag" and close:
            extra = [*extra, *self.tokenizer.encode(close, add_special_tokens=False)]
        return self._extend(kept, extra, features)

    # -- selection ------------------------------------------------------------------------------
    def _judge_prompt(
        self, instruction: str, recall: str, question: str, hint: str, texts: Sequence[str]
    ) -> str:
        return judge_prompt(instruction, recall, question, hint, texts)

    def _judge(self, prompt_text: str, features: Any, known: list[_State]) -> tuple[int | None, str]:
        """The judge's greedy answer to ``prompt_text`` (image + judge text) and its verdict."""
        return self._judge_many([prompt_text], features, known)[0]

    def _judge_many(
        self, prompt_texts: list[str], features: Any, known: list[_State]
    ) -> list[tuple[int | None, str]]:
        """The judge's greedy answers to several prompts, decoded as one batch: each prompt is
        prefilled from cache on its own, the caches are left-padded to one length and masked."""
        from transformers import DynamicCache

        states = []
        for text in prompt_texts:
            ids = self._ids(text)
            state = self._prefill(ids, features, known)
            known.append(_State(list(ids), copy.deepcopy(state.cache), state.logits))
            states.append(state)
        self.beams_judged += len(states)
        lengths = [len(st.ids) for st in states]
        width = max(lengths)
        cache = states[0].cache
        if len(states) > 1:
            cache = DynamicCache()
            for layer in range(len(states[0].cache.layers)):
                rows_k, rows_v = [], []
                for st, n in zip(states, lengths):
                    k, v = st.cache.layers[layer].keys, st.cache.layers[layer].values  # [1, H, n, D]
                    rows_k.append(torch.nn.functional.pad(k, (0, 0, width - n, 0)))
                    rows_v.append(torch.nn.functional.pad(v, (0, 0, width - n, 0)))
                cache.update(torch.cat(rows_k), torch.cat(rows_v), layer)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=self._device)
        logits = torch.stack([st.logits for st in states])  # [B, V]
        outs = self._greedy_batch(cache, mask, lengths, logits, features)
        texts = [self.tokenizer.decode(out, skip_special_tokens=True).strip() for out in outs]
        return [(parse_verdict(t), t) for t in texts]

    def _greedy_batch(
        self, cache: Any, mask: torch.Tensor, lengths: list[int], logits: torch.Tensor, features: Any
    ) -> list[list[int]]:
        """Greedy judge answers after ``cache`` (rows masked by ``mask`` [B, T], row r holding
        ``lengths[r]`` real tokens, ``logits`` [B, V] predicting the next), each ending at EOS / end
        of turn, a verdict, or ``max_judge_tokens``.

        With ``drafts`` each forward also checks a draft of the next tokens taken from earlier
        judge answers (prompt-lookup decoding, Saxena 2023; transformers' ``prompt_lookup_num_tokens``
        does the same inside ``generate``, which cannot start from this search's masked, left-padded
        batch cache): the tokens the model itself predicts at each draft position are kept up to the
        first one that differs, so the answer is the plain greedy one, in fewer forwards. A rejected
        draft position stays in the cache, masked out."""
        outs: list[list[int]] = [[] for _ in lengths]
        running = set(range(len(lengths)))
        positions = list(lengths)  # the position of each row's next token
        limit = self.max_judge_tokens

        def take(row: int, token: int) -> bool:
            """Append ``token`` to ``row``'s answer; False when the answer is over."""
            if token in self.stop_ids:
                return False
            outs[row].append(token)
            if _VERDICT.search(self.tokenizer.decode(outs[row][-12:], skip_special_tokens=True)):
                return False  # the verdict is out: the rest of the judgement is not read
            return len(outs[row]) < limit

        while True:
            chosen = logits.argmax(-1)  # [B]
            for row in sorted(running):
                if not take(row, int(chosen[row])):
                    running.discard(row)
            if not running:
                break
            drafts = {
                row: self._judge_draft(outs[row], limit - len(outs[row])) if self.drafts else []
                for row in running
            }
            blocks = [
                [outs[row][-1] if outs[row] else 0, *drafts.get(row, [])] for row in range(len(lengths))
            ]
            step_logits, mask = self._feed_blocks(blocks, cache, features, mask, positions)  # [B, span, V]
            predicted = step_logits.argmax(-1)  # [B, span]
            logits = step_logits[:, 0]
            for row in sorted(running):
                draft, kept = drafts[row], 0
                while kept < len(draft) and int(predicted[row, kept]) == draft[kept]:
                    kept += 1
                self.drafted += len(draft)
                self.draft_kept += kept
                alive = True
                for token in draft[:kept]:  # the model's own greedy tokens
                    alive = take(row, token)
                    if not alive:
                        break
                if not alive:
                    running.discard(row)
                logits[row] = step_logits[row, kept]
                _keep_fed(mask, positions, row, step_logits.shape[1], 1 + kept)
            if not running:
                break
        for out in outs:
            if out:
                self._judge_history.append(out)
        del self._judge_history[: -self.draft_memory]
        return outs

    def _judge_draft(self, out: list[int], budget: int) -> list[int]:
        """At most ``budget`` tokens that followed the longest (up to 3 tokens) suffix of ``out`` in
        an earlier judge answer: the latest answer holding it at the same position first (judge
        answers share one format), else its last occurrence in the latest answer holding it."""
        if budget <= 0 or not out:
            return []
        end = len(out)
        for past in reversed(self._judge_history):
            if len(past) > end and past[:end][-3:] == out[-3:]:
                return past[end : end + budget]
        for n in (3, 2, 1):
            if end < n:
                continue
            key = out[-n:]
            for past in reversed(self._judge_history):
                for i in range(len(past) - n - 1, -1, -1):
                    if past[i : i + n] == key:
                        return past[i + n : i + n + budget]
        return []

    def _select(
        self,
        texts: list[str],
        candidates: list[_Candidate],
        *,
        stage: Stage | None,
        instruction: str,
        recall: str,
        hint: str,
        context: dict[str, Any],
        features: Any,
        known: list[_State],
        record: dict[str, Any],
    ) -> int:
        if len(candidates) == 1:
            return 0
        if callable(self.selection):
            scores = [float(self.selection(stage.name if stage else "", t, context)) for t in texts]
            record["scores"] = scores
            return max(range(len(scores)), key=scores.__getitem__)
        if self.selection == "logprob":
            return max(range(len(candidates)), key=lambda i: candidates[i].mean_logprob)
        judgements = record.setdefault("judgements", [])
        if self.knockout == "speculative":
            return self._speculative_bracket(
                texts, candidates, instruction, recall, hint, context, features, known, judgements
            )
        if self.knockout == "bracket":
            return self._bracket(
                texts, candidates, instruction, recall, hint, context, features, known, judgements
            )
        champion = 0
        for challenger in range(1, len(candidates)):  # knock-out: the winner meets the next
            pair = (champion, challenger)
            prompt = self._judge_prompt(
                instruction, recall, context["question"], hint, [texts[i] for i in pair]
            )
            verdict, said = self._judge(self._judge_text(prompt), features, known)
            fallback = verdict is None
            if fallback:  # the judge named neither: the more probable candidate wins
                verdict = int(candidates[challenger].mean_logprob > candidates[champion].mean_logprob)
                self.judge_fallbacks += 1
            champion = pair[verdict]
            judgements.append({"pair": list(pair), "answer": said, "winner": champion, "fallback": fallback})
        return champion

    def _verdict(
        self,
        pair: tuple[int, int],
        verdict: int | None,
        said: str,
        candidates: list[_Candidate],
        judgements: list,
    ) -> int:
        fallback = verdict is None
        if verdict is None:  # the judge named neither: the more probable candidate wins
            verdict = int(candidates[pair[1]].mean_logprob > candidates[pair[0]].mean_logprob)
            self.judge_fallbacks += 1
        judgements.append({"pair": list(pair), "answer": said, "winner": pair[verdict], "fallback": fallback})
        return pair[verdict]

    def _bracket(
        self, texts, candidates, instruction, recall, hint, context, features, known, judgements
    ) -> int:
        """Knock-out by rounds ((0,1), (2,3), ... then their winners), each round's judges as one batch."""
        alive = list(range(len(candidates)))
        while len(alive) > 1:
            pairs = [(alive[i], alive[i + 1]) for i in range(0, len(alive) - 1, 2)]
            prompts = [
                self._judge_text(
                    self._judge_prompt(
                        instruction, recall, context["question"], hint, [texts[i] for i in pair]
                    )
                )
                for pair in pairs
            ]
            answers = self._judge_many(prompts, features, known)
            winners = [
                self._verdict(pair, v, said, candidates, judgements)
                for pair, (v, said) in zip(pairs, answers)
            ]
            alive = winners + ([alive[-1]] if len(alive) % 2 else [])
        return alive[0]

    def _speculative_bracket(
        self, texts, candidates, instruction, recall, hint, context, features, known, judgements
    ) -> int:
        """The bracket's knock-out, its verdicts taken from every pair (i < j) judged as one batch."""
        n = len(candidates)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        prompts = [
            self._judge_text(
                self._judge_prompt(instruction, recall, context["question"], hint, [texts[i] for i in pair])
            )
            for pair in pairs
        ]
        answers = dict(zip(pairs, self._judge_many(prompts, features, known)))
        alive = list(range(n))
        used = 0
        while len(alive) > 1:
            round_pairs = [(alive[i], alive[i + 1]) for i in range(0, len(alive) - 1, 2)]
            winners = [self._verdict(pair, *answers[pair], candidates, judgements) for pair in round_pairs]
            used += len(round_pairs)
            alive = winners + ([alive[-1]] if len(alive) % 2 else [])
        self.beams_judged -= len(pairs) - used  # _judge_many counted every prompt
        self.speculative_judged += len(pairs) - used
        return alive[0]

    # -- prompts --------------------------------------------------------------------------------
    def _judge_text(self, judge_prompt: str) -> str:
        from mllm.data.formats import Turn
        from mllm.inference.generate import build_generation_prompt

        token = self.processor.image_token
        marks = "\n".join([token] * self._n_images)
        content = f"{marks}\n{judge_prompt}" if marks else judge_prompt
        return build_generation_prompt([Turn("user", content)], self.tokenizer, self.chat.template)

    def _ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, as `MllmProcessor` makes them (no image preprocessing)."""
        expanded = self.processor.expand_image_tokens(text)
        return list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])

    # -- search ---------------------------------------------------------------------------------
    def run(
        self,
        conversation: Any,
        images: Sequence[Any] | None = None,
        *,
        on_stage: Callable[[dict[str, Any]], None] | None = None,
        max_new_tokens: int | None = None,
        record_logits: bool = False,
    ) -> SearchResult:
        """Answer ``conversation`` (a prompt, `Turn`s or chat messages, as `ChatModel.generate`
        takes them) with the search; ``on_stage`` gets each stage's trace entry as it is decided.
        ``max_new_tokens`` bounds each stage (default ``max_stage_tokens``)."""
        prompt_text, loaded = self.chat.prompt(conversation, images)
        self._images, self._n_images = loaded, len(loaded)
        self.tokens_computed, self.vision_calls, self.judge_fallbacks, self.beams_judged = 0, 0, 0, 0
        self.speculative_judged, self.forwards, self.drafted, self.draft_kept = 0, 0, 0, 0
        stage_limit = max_new_tokens or self.max_stage_tokens
        question = _question_of(conversation, self.processor.image_token)
        batch = self.processor(text=[prompt_text], images=[loaded] if loaded else None)
        device = self._device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                features = None
                if loaded:
                    features = self.base.get_image_features(
                        batch["pixel_values"].to(device)
                    )  # [N_img, T_img, D]
                    self.vision_calls += 1
                prompt_ids = batch["input_ids"][0].tolist()
                state = self._prefill(prompt_ids, features, [])
                known = [_State(list(state.ids), copy.deepcopy(state.cache), state.logits)]
                trace_stages, logits_out, prefixes = self._search(
                    state, prompt_ids, features, known, question, stage_limit, on_stage, record_logits
                )
        finally:
            self.model.train(was_training)
        sequence = trace_stages.pop()
        answer = self.tokenizer.decode(sequence[len(prompt_ids) :], skip_special_tokens=True).strip()
        warnings = self._tag_warnings()
        trace = {
            "method": self.method,
            "beams": self.beams,
            "selection": self.selection if isinstance(self.selection, str) else "function",
            "question": question,
            "stages": trace_stages,
            "answer": answer,
            "judgements": self.beams_judged,
            "judge_fallbacks": self.judge_fallbacks,
            "speculative_judgements": self.speculative_judged,
            "vision_calls": self.vision_calls,
            "tokens_computed": self.tokens_computed,
            "forwards": self.forwards,
            "draft_tokens": {"proposed": self.drafted, "kept": self.draft_kept},
            "warnings": warnings,
        }
        return SearchResult(
            answer, stage_text(answer, self.stages[-1]), trace, sequence, logits_out, prefixes
        )

    def _tag_warnings(self) -> list[str]:
        out = []
        for stage in self.stages:
            for tag in (stage.open_tag, stage.close_tag):
                ids = self.tokenizer.encode(tag, add_special_tokens=False)
                if self.tokenizer.decode(ids, skip_special_tokens=False) != tag:
                    out.append(
                        f"the tokenizer cannot write {tag!r}: its stage ends only at EOS or the token limit"
                    )
        return out

    def _plan(self) -> list[tuple[Stage | None, list[str], str, str]]:
        """(stage, stop strings, judge instruction, recall) per search step of the method."""
        if self.method == "best_of_n":
            return [(None, [self.stages[-1].close_tag], JUDGE_ALL, "")]
        if self.method == "sentence":
            return [(None, [".", self.stages[-1].close_tag], JUDGE_SENTENCE, "")] * self.max_sentences
        return [(s, [s.close_tag], s.judge, s.recall) for s in self.stages]

    def _search(
        self,
        state: _State,
        prompt_ids: list[int],
        features: Any,
        known: list[_State],
        question: str,
        stage_limit: int,
        on_stage: Callable[[dict[str, Any]], None] | None,
        record_logits: bool,
    ) -> tuple[list[Any], list[list[torch.Tensor]], list[list[int]]]:
        accepted: dict[str, str] = {}  # stage name -> accepted inner text
        trace: list[Any] = []
        logits_out: list[list[torch.Tensor]] = []
        prefixes: list[list[int]] = []
        final = self.stages[-1].close_tag
        carry = ""  # text of the last accepted token past its stop string (a token like `>\n<`)
        for index, (stage, stops, instruction, recall) in enumerate(self._plan()):
            n = self.beams
            history = self._stage_history.setdefault(tuple(stops), [])
            candidates, cache, mask = self.sample_candidates(
                state, n, stops, stage_limit, features, record_logits, history
            )
            cut = [self._text(c.tokens, stops) for c in candidates]
            texts = [carry + text for text, _ in cut]
            answer_so_far = self.tokenizer.decode(state.ids[len(prompt_ids) :], skip_special_tokens=True)
            record: dict[str, Any] = {"name": stage.name if stage else f"{self.method}-{index}"}
            hint = ""
            shown = texts
            if stage is not None:
                hint = " ".join(accepted.get(name, "") for name in stage.hint_from).strip()
                shown = [_inside(t, stage) for t in texts]
            elif self.method == "sentence":
                hint = answer_so_far.strip()
            context = {"question": question, "answer_so_far": answer_so_far}
            winner = self._select(
                shown,
                candidates,
                stage=stage,
                instruction=instruction,
                recall=recall,
                hint=hint,
                context=context,
                features=features,
                known=known,
                record=record,
            )
            chosen = candidates[winner]
            close = stage.close_tag if stage is not None else (final if self.method == "best_of_n" else "")
            if record_logits:
                logits_out.append([torch.stack(c.logits) if c.logits else torch.empty(0) for c in candidates])
                prefixes.append(list(state.ids))
            state = self._accept(state, cache, mask, winner, chosen, close, n, features)
            history.append(list(chosen.tokens))
            del history[: -self.draft_memory]
            record.update(
                candidates=[
                    {
                        "text": t,
                        "tokens": len(c.tokens),
                        "ids": list(c.tokens),
                        "mean_logprob": round(c.mean_logprob, 4),
                        "closed_by": c.closed_by,
                    }
                    for t, c in zip(texts, candidates)
                ],
                winner=winner,
                text=texts[winner],
                closed_by=chosen.closed_by,
            )
            if stage is not None:
                accepted[stage.name] = shown[winner]
                if chosen.closed_by != "tag":
                    record["note"] = f"closed by the search ({chosen.closed_by}): {stage.close_tag} appended"
            trace.append(record)
            carry = cut[winner][1]
            if on_stage is not None:
                on_stage(record)
            if self.method == "sentence" and (chosen.closed_by == "eos" or final in texts[winner]):
                break
        trace.append(state.ids)  # popped by run(): the whole sequence
        return trace, logits_out, prefixes

    def _text(self, tokens: list[int], stops: Sequence[str]) -> tuple[str, str]:
        """A candidate's text up to its first stop string, and the rest of its last token's text."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stops if s in text]
        end = min(ends) if ends else len(text)
        return text[:end], text[end:]


def judge_prompt(instruction: str, recall: str, question: str, hint: str, texts: Sequence[str]) -> str:
    """The pairwise judge's question (after the image), as LLaVA-CoT's ``judge()`` writes it: the
    instruction, the question, the hint, the two responses, the reminder and the output format."""
    prompt = f"{instruction}\n\nQuestion: {question}"
    if hint:
        prompt += f"\n\nHint about the Question: {hint}"
    for i, text in enumerate(texts):
        prompt += f"\nResponse {i + 1}: {text}"
    return prompt + f"\n\n{recall}" + _FORMAT


def stage_text(answer: str, stage: Stage | None = None) -> str:
    """The text inside ``stage``'s tags in a whole answer (default: the last default stage, the
    ``<CONCLUSION>``); an opened, never closed stage runs to the end; "" when the stage is absent."""
    stage = stage or DEFAULT_STAGES[-1]
    found = re.search(re.escape(stage.open_tag) + r"(.*?)" + re.escape(stage.close_tag), answer, re.DOTALL)
    if found is None and stage.open_tag in answer:
        found = re.search(re.escape(stage.open_tag) + r"(.*)$", answer, re.DOTALL)
    return found.group(1).strip() if found else ""


def _inside(text: str, stage: Stage) -> str:
    """A candidate's text inside its stage's tags (what LLaVA-CoT's judge compares)."""
    start = text.find(stage.open_tag)
    start = start + len(stage.open_tag) if start >= 0 else 0
    end = text.find(stage.close_tag, start)
    return text[start : end if end >= 0 else len(text)].strip()


def _question_of(conversation: Any, image_token: str) -> str:
    from mllm.inference.api import to_turns

    turns, _ = to_turns(conversation, image_token)
    return turns[-1].content.replace(image_token, "").strip()
