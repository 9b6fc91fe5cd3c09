"""Build tiny, random-init Hugging Face components offline, in seconds.

Tests and the main job use these instead of Hub ids; the loading code is the same
(`from_pretrained` on a folder). Nothing here touches the network.

    python scripts/build_tiny_components.py --output runs/tiny

writes::

    OUTPUT/tokenizer-corpus.txt
    OUTPUT/clip-vision/     CLIPVisionModel + image processor
    OUTPUT/siglip-vision/   SiglipVisionModel + image processor
    OUTPUT/llama/           LlamaForCausalLM + tokenizer with a Llama-3-style chat template, no pad token
    OUTPUT/qwen2/           Qwen2ForCausalLM + tokenizer with a ChatML chat template
    OUTPUT/gpt2/            GPT2LMHeadModel + tokenizer without a chat template
"""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

__all__ = ["TinySizes", "build_tiny_components", "build_tokenizer", "tokenizer_corpus", "main"]

# Vocabulary of the synthetic shapes world (data_tools.synth) and of ordinary chat text,
# so the trained BPE has whole-word tokens for what the main job says. Byte-level BPE
# still encodes any other text.
_WORDS = """
a an the is are there of on in at to and or with what which where how many color colour shape shapes
circle circles square squares triangle triangles red green blue yellow purple orange black white gray
left right top bottom center middle upper lower small large big bigger smaller biggest smallest one two
three four five yes no image picture photo describe briefly detail question answer please look carefully
summary caption reasoning conclusion first second third count counted visible shown object objects
leftmost rightmost above below next beside than more fewer same different it this that these those
i you we they can see contains showing shows background single only both each all none
""".split()
_TEMPLATES = [
    "a {c} {s} on the {p}",
    "there is a {z} {c} {s} at the {p} of the image",
    "how many {s}s are there? {n}",
    "what color is the {s}? {c}",
    "is there a {c} {s}? {yn}",
    "where is the {c} {s}? {p}",
    "<SUMMARY>i will look at the image and count the shapes.</SUMMARY>",
    "<CAPTION>the image shows a {c} {s} on the {p}.</CAPTION>",
    "<REASONING>the {s} is {c}, so the answer is {c}.</REASONING><CONCLUSION>{c}</CONCLUSION>",
    "USER: <image>\nDescribe the image briefly. ASSISTANT: a {c} {s}.",
    "Please answer the question with a single word or phrase.",
]
_COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
_SHAPES = ["circle", "square", "triangle"]
_PLACES = ["left", "right", "top", "bottom", "center", "top left", "bottom right"]

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySizes:
    """Widths of the tiny components; vision and LLM widths differ on purpose (the connector maps them)."""

    vision_hidden: int = 32  # vision tower width
    vision_layers: int = 2  # vision transformer blocks
    image_size: int = 48  # input resolution of the vision tower
    patch_size: int = 16  # (48 / 16)^2 = 9 patches: one per cell of data_tools.synth's 3x3 grid
    llm_hidden: int = 64  # LLM width
    llm_layers: int = 2  # LLM decoder blocks
    llm_heads: int = 4  # attention heads of the LLM
    vocab_size: int = 1024  # target BPE vocabulary (special tokens included)
    max_positions: int = 2048  # context length of the LLM

    @property
    def llm_init_std(self) -> float:
        """Std of the LLMs' random init: 1/sqrt(width). The Hub configs' 0.02 suits widths in the
        thousands; at width 64-128 it starts every layer near zero, and attention takes hundreds of
        steps before it learns to look anything up (measured: 0.02 -> 53%, 1/sqrt(128) -> 73% on the
        shapes questions after the same 1000 steps)."""
        return self.llm_hidden**-0.5


def tokenizer_corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """A deterministic corpus in the synthetic world's words, for training the BPE tokenizer."""
    rng = random.Random(seed)
    # Each word also alone on a line: a chat template puts an answer right after a newline, with no
    # leading space, and byte-level BPE learns " red" and "red" as different tokens.
    out = [" ".join(_WORDS), *_WORDS]
    for _ in range(lines):
        template = rng.choice(_TEMPLATES)
        out.append(
            template.format(
                c=rng.choice(_COLORS),
                s=rng.choice(_SHAPES),
                p=rng.choice(_PLACES),
                z=rng.choice(["small", "large"]),
                n=rng.choice(["1", "2", "3"]),
                yn=rng.choice(["yes", "no"]),
            )
        )
    return out


def build_tokenizer(
    corpus: list[str],
    special_tokens: list[str],
    vocab_size: int,
    chat_template: str | None,
    **named_tokens: str,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **named_tokens)
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def _save_llm(config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_components(
    output: str | Path, sizes: TinySizes = TinySizes(), seed: int = 0
) -> dict[str, Path]:
    """Build every tiny component under ``output``; returns name -> folder."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    corpus = tokenizer_corpus(seed)
    (output / "tokenizer-corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    paths: dict[str, Path] = {}

    # Vision towers.
    vision_common = dict(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_hidden * 2,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=2,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
    )  # CLIP / SigLIP already scale their layers' init by width
    square = {"height": sizes.image_size, "width": sizes.image_size}
    for name, config, processor in (
        (
            "clip-vision",
            CLIPVisionConfig(projection_dim=sizes.vision_hidden, **vision_common),
            CLIPImageProcessorPil(size={"shortest_edge": sizes.image_size}, crop_size=square),
        ),
        ("siglip-vision", SiglipVisionConfig(**vision_common), SiglipImageProcessorPil(size=square)),
    ):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
        model.save_pretrained(output / name)
        processor.save_pretrained(output / name)
        paths[name] = output / name

    # LLMs: three families, three tokenizer conventions.
    llm_common = dict(
        hidden_size=sizes.llm_hidden,
        intermediate_size=sizes.llm_hidden * 2,
        num_hidden_layers=sizes.llm_layers,
        num_attention_heads=sizes.llm_heads,
        num_key_value_heads=max(1, sizes.llm_heads // 2),
        max_position_embeddings=sizes.max_positions,
        initializer_range=sizes.llm_init_std,
    )
    llama_tok = build_tokenizer(
        corpus,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        sizes.vocab_size,
        LLAMA3_CHAT_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )  # like Llama-3: no pad token
    qwen_tok = build_tokenizer(
        corpus,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        sizes.vocab_size,
        CHATML_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    gpt2_tok = build_tokenizer(
        corpus,
        ["<|endoftext|>"],
        sizes.vocab_size,
        None,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )
    llms = {
        "llama": (
            LlamaConfig(
                vocab_size=len(llama_tok),
                bos_token_id=llama_tok.bos_token_id,
                eos_token_id=llama_tok.eos_token_id,
                tie_word_embeddings=False,
                **llm_common,
            ),
            llama_tok,
        ),
        "qwen2": (
            Qwen2Config(
                vocab_size=len(qwen_tok),
                eos_token_id=qwen_tok.eos_token_id,
                tie_word_embeddings=True,
                **llm_common,
            ),
            qwen_tok,
        ),
        "gpt2": (
            GPT2Config(
                vocab_size=len(gpt2_tok),
                n_embd=sizes.llm_hidden,
                n_layer=sizes.llm_layers,
                n_head=sizes.llm_heads,
                n_positions=sizes.max_positions,
                initializer_range=sizes.llm_init_std,
                bos_token_id=gpt2_tok.bos_token_id,
                eos_token_id=gpt2_tok.eos_token_id,
            ),
            gpt2_tok,
        ),
    }
    for offset, (name, (config, tokenizer)) in zip(itertools.count(1), llms.items()):
        _save_llm(config, tokenizer, output / name, seed + offset)
        paths[name] = output / name
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/tiny", help="folder to write the components into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    paths = build_tiny_components(args.output, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
