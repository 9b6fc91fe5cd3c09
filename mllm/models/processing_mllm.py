"""`MllmProcessor`: the vision tower's image processor + the LLM's tokenizer + `<image>` expansion.

Works with pillow alone: image processors are loaded with the PIL backend, never torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mllm.messages import flatten_messages

__all__ = ["MllmProcessor", "ensure_image_token", "count_placeholders"]


def ensure_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str) -> int:
    """Add ``image_token`` as a special token if missing; return its id.

    A string the tokenizer already knows as an ordinary (non-special) token would make real text
    collide with image positions, so it is refused.
    """
    added = {t.content if hasattr(t, "content") else str(t) for t in tokenizer.added_tokens_decoder.values()}
    vocab = tokenizer.get_vocab()
    if image_token in vocab and image_token not in added:
        raise ValueError(
            f"image token {image_token!r} is already an ordinary token (id {vocab[image_token]}) of the "
            "tokenizer, so real text would be taken for image positions; choose another image_token "
            "(e.g. '<image>')."
        )
    if image_token not in vocab:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False
        )
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"image token {image_token!r} must encode to one id, got {ids}.")
    return ids[0]


def count_placeholders(text: str, image_token: str) -> int:
    return text.count(image_token)


class MllmProcessor(ProcessorMixin):
    """Turns (text with `<image>` placeholders, images) into model inputs.

    Each placeholder is expanded into ``num_image_tokens`` copies of the image token, so the model
    finds exactly one image-token run per image.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token: str = "<image>",
        num_image_tokens: int = 1,
        chat_template: str | None = None,
        **kwargs,
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}.")
        self.image_token = image_token  # placeholder string in prompts
        self.num_image_tokens = num_image_tokens  # tokens each image occupies (MllmConfig.num_image_tokens)
        self.image_token_id = ensure_image_token(tokenizer, image_token)
        if tokenizer.pad_token is None:
            # Llama-3-style tokenizers ship without a pad token; padding is masked, so EOS is safe to reuse.
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_components(
        cls, vision: str, llm: str, num_image_tokens: int, image_token: str = "<image>", **kwargs
    ) -> MllmProcessor:
        """Image processor of the vision tower ``vision`` + tokenizer of ``llm`` (Hub ids or local paths)."""
        image_processor = AutoImageProcessor.from_pretrained(vision, backend="pil", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(llm, **kwargs)
        return cls(image_processor, tokenizer, image_token=image_token, num_image_tokens=num_image_tokens)

    def expand_image_tokens(self, text: str) -> str:
        """Replace every placeholder with ``num_image_tokens`` image tokens."""
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        add_special_tokens: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise ``text`` (one prompt or a batch) and preprocess ``images``.

        ``images`` is one image, a flat list in the order the placeholders appear across the batch,
        or one list per prompt. The placeholder count must equal the number of images, per prompt
        where that is known.
        """
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = self._flatten_images(texts, images)
        total = sum(count_placeholders(t, self.image_token) for t in texts)
        if total != len(flat_images):
            raise ValueError(
                f"the prompt{'s' if len(texts) > 1 else ''} hold {total} {self.image_token!r} placeholder(s) "
                f"but {len(flat_images)} image(s) were given; put one {self.image_token!r} where each image goes."
            )
        expanded = [self.expand_image_tokens(t) for t in texts]
        encoding = self.tokenizer(
            expanded,
            return_tensors=return_tensors,
            padding=padding,
            add_special_tokens=add_special_tokens,
            **kwargs,
        )
        data = dict(encoding)
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors=return_tensors)[
                "pixel_values"
            ]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _flatten_images(
        self,
        texts: list[str],
        images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]] | None,
    ) -> list[Image.Image]:
        if images is None:
            return []
        if isinstance(images, Image.Image):
            return [images]
        images = list(images)
        if images and all(isinstance(group, (list, tuple)) for group in images):
            if len(images) != len(texts):
                raise ValueError(
                    f"got {len(images)} image lists for {len(texts)} prompts; give one list per prompt."
                )
            for index, (prompt, group) in enumerate(zip(texts, images)):
                n = count_placeholders(prompt, self.image_token)
                if n != len(group):
                    raise ValueError(
                        f"prompt {index} holds {n} {self.image_token!r} placeholder(s) but {len(group)} image(s) "
                        "were given for it."
                    )
            return [image for group in images for image in group]
        return images

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "pt",
        images: Sequence[Image.Image] | Sequence[Sequence[Image.Image]] | None = None,
        **kwargs: Any,
    ) -> str | list[str] | BatchFeature | Any:
        """Render transformers-style multimodal messages with the LLM's own chat template.

        Content may be a string or a list of parts (``{"type": "image"}``, ``{"type": "text", ...}``):
        parts become one string with the image placeholder where each image part stands
        (`mllm.messages.flatten_content`), so templates that render ``message['content']`` as a
        string (ChatML, Llama, Phi-3, Gemma, ...) accept them, as training does. With ``tokenize``
        the prompt goes through ``self(...)`` with the images the parts carry inline (PIL images,
        paths or URLs, loaded with transformers' ``load_image``); ``return_dict`` returns the whole
        ``BatchFeature`` instead of ``input_ids``. ``images`` (in placeholder order; one list per
        conversation when batched) replaces the inline ones, for image parts that carry none.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        flattened = [flatten_messages(messages, self.image_token) for messages in conversations]
        template = chat_template if chat_template is not None else self.chat_template
        prompts = [
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
            for messages, _ in flattened
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        if images is not None:
            return_value = self(
                text=prompts if batched else prompts[0], images=images, return_tensors=return_tensors
            )
            return return_value if return_dict else return_value["input_ids"]
        from transformers.image_utils import load_image

        images = [
            [image if isinstance(image, Image.Image) else load_image(image) for image in found]
            for _, found in flattened
        ]
        has_images = any(images)
        out = self(
            text=prompts if batched else prompts[0],
            images=(images if batched else images[0]) if has_images else None,
            return_tensors=return_tensors,
        )
        return out if return_dict else out["input_ids"]

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
