"""Teach a tiny random-init LLM the text of the synthetic corpus (no images), with transformers' Trainer.

The main job runs this before stage 1 so that stage 1 can keep the LLM frozen, as LLaVA does with a
real pretrained LLM. The conversations of the training split are rendered with the LLM's own chat
template and learned as plain causal-LM text, each image placeholder removed, or, with ``--captions``,
replaced by the scene's caption (the LLM then learns to answer from a description in its context; the
main job does not do that: a tiny LLM trained so learned to answer from image tokens more slowly later).

    python -m scripts.pretrain_text_llm --llm runs/tiny/llama --data runs/data/stage2_train.json --output DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

from mllm.io import atomic_dir

__all__ = ["captions_by_image", "conversation_texts", "pretrain_text_llm", "main"]

_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def conversation_texts(
    data_files: list[Path], captions: dict[str, str] | None = None, placeholder: str = "<image>"
) -> list[list[dict[str, str]]]:
    """LLaVA json files -> chat messages; a placeholder becomes the image's caption (or is removed)."""
    captions = captions or {}
    chats = []
    for path in data_files:
        for record in json.loads(Path(path).read_text(encoding="utf-8")):
            scene = captions.get(record.get("image", ""), "")
            chats.append(
                [
                    {
                        "role": _ROLES[turn["from"]],
                        "content": turn["value"].replace(placeholder, scene).strip(),
                    }
                    for turn in record["conversations"]
                ]
            )
    return chats


def captions_by_image(caption_file: Path) -> dict[str, str]:
    """image path -> its caption (the first assistant turn), from a stage-1 LLaVA json file."""
    records = json.loads(Path(caption_file).read_text(encoding="utf-8"))
    return {r["image"]: r["conversations"][1]["value"] for r in records if isinstance(r.get("image"), str)}


class _CausalLmCollator:
    """Right-pads and supervises every real token.

    Written here rather than using DataCollatorForLanguageModeling: that collator masks every token
    equal to the pad id, and a tokenizer without a pad token pads with EOS, so EOS would never be
    learned and generation would not stop. mllm's own MllmCollator expects labels and adds a
    `skipped` key that only MllmTrainer removes before the forward pass.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[row, : len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def pretrain_text_llm(
    llm: str | os.PathLike,
    data_files: list[Path],
    output: str | os.PathLike,
    captions: dict[str, str] | None = None,
    max_steps: int = 300,
    learning_rate: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``llm`` on the rendered conversations; write it (and its tokenizer) to ``output`` atomically."""
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chats = conversation_texts(data_files, captions)
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    else:
        texts = [" ".join(m["content"] for m in chat) + tokenizer.eos_token for chat in chats]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], add_special_tokens=False, truncation=True, max_length=256),
        batched=True,
        remove_columns=["text"],
    )
    model = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="pretrain-text-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, max_steps // 20),
            weight_decay=0.0,
            logging_steps=max(1, max_steps // 10),
            save_strategy="no",
            report_to="none",
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=_CausalLmCollator(tokenizer.pad_token_id),
        )
        result = trainer.train()
    with atomic_dir(output) as staging:  # a crash while saving leaves the previous folder intact
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return {"train_loss": float(result.training_loss), "steps": float(result.global_step)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llm", required=True, help="LLM folder or Hub id")
    parser.add_argument("--data", required=True, nargs="+", type=Path, help="LLaVA json files")
    parser.add_argument("--output", required=True, help="where to write the trained LLM")
    parser.add_argument("--captions", type=Path, help="stage-1 json whose captions replace the placeholders")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)
    captions = captions_by_image(args.captions) if args.captions else None
    stats = pretrain_text_llm(args.llm, args.data, args.output, captions, args.max_steps, args.learning_rate)
    print(
        f"pretrain_text_llm: {stats['steps']:.0f} steps, final mean loss {stats['train_loss']:.3f} -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
