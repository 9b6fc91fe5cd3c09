"""`mllm chat MODEL [--image PATH] [--cot] [--beams N] [--max-new-tokens N] [--temperature T]`.

A local REPL on any `mllm train` output dir: the answer streams as it is generated, the conversation
is kept (multi-turn, rendered with the template the run was trained with) and, when it no longer
fits the model's context with room for an answer, its oldest exchange is dropped with a one-line
notice; the current image is never dropped (its placeholder moves to the oldest kept question).

Commands: ``/image PATH`` (add or switch the image; the next question carries it, an earlier image
leaves the conversation), ``/reset`` (forget the conversation, keep the image), ``/save FILE`` (the
conversation as a LLaVA-format record), ``/help``, ``/exit`` (or Ctrl-D). A missing or unreadable
image, or an unknown command, prints one line and the session goes on.

With ``--cot`` the answer is LLaVA-CoT's four tagged stages, each printed as it is decided; with
``--beams N`` each stage is chosen among N sampled candidates (`mllm.inference.stage_beam`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["ChatSession", "main"]

HELP = """commands:
  /image PATH  add or switch the image (the next question carries it)
  /reset       forget the conversation (the image stays)
  /save FILE   write the conversation as a LLaVA-format record (json)
  /help        this message
  /exit        leave (also Ctrl-D)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm chat", description="Chat with a trained model in the terminal."
    )
    parser.add_argument("model", help="an `mllm train` output dir (or checkpoint-N)")
    parser.add_argument("--image", help="the image to talk about (also: /image PATH in the session)")
    parser.add_argument("--cot", action="store_true", help="answer in LLaVA-CoT's tagged stages")
    parser.add_argument("--beams", type=int, default=1, help="with --cot: candidates per stage (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--template", help="override the chat template the run recorded")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on cuda"
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="quantize the LLM to 4 bit (CUDA)")
    return parser


@dataclass
class ChatSession:
    """The conversation of one `mllm chat`: turns, the current image, and the model that answers."""

    chat: Any  # mllm.inference.ChatModel
    max_new_tokens: int = 256
    temperature: float = 0.0
    cot: bool = False
    beams: int = 1
    out: TextIO = sys.stdout
    turns: list[Any] = field(default_factory=list)  # Turn, user / assistant alternating
    image_path: str | None = None
    image: Any = None  # the decoded current image
    image_pending: bool = False  # the next question carries the image

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- commands -----------------------------------------------------------------------------
    def set_image(self, path: str) -> bool:
        from mllm.data.errors import BadRecordError
        from mllm.data.images import load_image

        path = os.path.expanduser(path.strip())
        if not path:
            self.say("usage: /image PATH")
            return False
        try:
            image = load_image(path, record_id="chat", source="/image")
        except BadRecordError as err:
            self.say(f"cannot use image {path}: {err.detail}")
            return False
        self._strip_image()
        self.image_path, self.image, self.image_pending = path, image, True
        self.say(f"image: {path} ({image.width}x{image.height})")
        return True

    def _strip_image(self) -> None:
        from mllm.data.formats import Turn

        token = self.chat.processor.image_token
        self.turns = [
            Turn(t.role, t.content.replace(token + "\n", "").replace(token, "")) for t in self.turns
        ]

    def reset(self) -> None:
        self.turns = []
        self.image_pending = self.image is not None
        self.say(
            "conversation cleared" + (f" (image {self.image_path} kept)" if self.image is not None else "")
        )

    def save(self, path: str) -> None:
        path = os.path.expanduser(path.strip())
        if not path:
            self.say("usage: /save FILE")
            return
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        record: dict[str, Any] = {"id": "chat"}
        if self.image_path is not None and not self.image_pending:
            record["image"] = os.path.abspath(self.image_path)
        record["conversations"] = [{"from": names[t.role], "value": t.content} for t in self.turns]
        try:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump([record], handle, ensure_ascii=False, indent=2)
        except OSError as err:
            self.say(f"cannot save to {path}: {err.strerror or err}")
            return
        self.say(f"saved {len(self.turns)} turns to {path}")

    # -- answering ----------------------------------------------------------------------------
    def _fit(self, turns: list[Any]) -> list[Any]:
        """Drop the oldest exchanges until the prompt leaves room for an answer (notice per drop)."""
        from mllm.data.formats import Turn
        from mllm.inference.generate import build_generation_prompt

        limit = self.chat.context_length
        if limit is None:
            return turns
        token = self.chat.processor.image_token
        while True:
            text = build_generation_prompt(turns, self.chat.processor.tokenizer, self.chat.template)
            if self.chat.prompt_length(text) + self.max_new_tokens <= limit or len(turns) <= 1:
                return turns
            dropped, turns = turns[:2], turns[2:]
            if any(token in t.content for t in dropped) and not any(token in t.content for t in turns):
                first = turns[0]
                turns[0] = Turn(first.role, f"{token}\n{first.content}")  # the image stays
            self.say(f"(dropped the oldest exchange to fit the {limit}-token context)")

    def ask(self, question: str) -> str:
        from mllm.data.formats import Turn
        from mllm.inference.generate import build_generation_prompt

        token = self.chat.processor.image_token
        if self.image_pending and token not in question:
            question = f"{token}\n{question}"
        turns = self._fit([*self.turns, Turn("user", question)])
        images = [self.image] if any(token in t.content for t in turns) else []
        text = build_generation_prompt(turns, self.chat.processor.tokenizer, self.chat.template)
        if self.cot:
            answer = self._cot(turns, images)
        else:
            pieces = []
            for piece in self.chat.stream_prompt(
                text, images, max_new_tokens=self.max_new_tokens, temperature=self.temperature
            ):
                pieces.append(piece)
                print(piece, end="", file=self.out, flush=True)
            print(file=self.out, flush=True)
            answer = "".join(pieces).strip()
        self.turns = [*turns, Turn("assistant", answer)]
        self.image_pending = False
        return answer

    def _cot(self, turns: list[Any], images: list[Any]) -> str:
        from mllm.inference.stage_beam import StageBeamSearch

        search = StageBeamSearch(self.chat, beams=self.beams, temperature=self.temperature or 0.7)

        def shown(stage: dict[str, Any]) -> None:
            head = f"[{stage['name']}]"
            if len(stage["candidates"]) > 1:
                head += f" {len(stage['candidates'])} candidates, #{stage['winner'] + 1} won"
            closed = {"limit": "the token limit", "eos": "the end of the turn"}.get(stage["closed_by"])
            note = f" (closed by the search at {closed})" if closed else ""
            self.say(f"{head} {stage['text'].strip()}{note}")

        result = search.run(turns, images, on_stage=shown, max_new_tokens=self.max_new_tokens)
        return result.answer

    # -- the loop -----------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        name, _, argument = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/image":
            self.set_image(argument)
        elif name == "/reset":
            self.reset()
        elif name == "/save":
            self.save(argument)
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return True

    def loop(self, read: Any = input) -> None:
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                self.say("")
                return
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            print("model> ", end="", file=self.out, flush=True)
            self.ask(line)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.beams < 1:
        raise ValueError(f"--beams must be >= 1, got {args.beams}.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    from mllm.inference.api import ChatModel

    chat = ChatModel.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        template=args.template,
    )
    session = ChatSession(chat, args.max_new_tokens, args.temperature, args.cot, args.beams)
    session.say(
        f"mllm chat: {args.model} (template {chat.template or 'of the tokenizer'}); /help for commands"
    )
    if args.image is not None:
        session.set_image(args.image)
    with warnings.catch_warnings():
        # library deprecation notices would land in the middle of a streamed answer
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        session.loop()
    return 0
