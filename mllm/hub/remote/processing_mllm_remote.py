"""Processor of an mllm model exported with its own code (written by `mllm export --to remote-code`).

The vision tower's image processor + the LLM's tokenizer; each ``<image>`` placeholder becomes
``num_image_tokens`` image tokens. Needs only transformers.
"""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin

__all__ = ["MllmRemoteProcessor"]


class MllmRemoteProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token="<image>",
        num_image_tokens=1,
        chat_template=None,
        **kwargs,
    ):
        self.image_token = image_token  # placeholder string in prompts
        self.num_image_tokens = num_image_tokens  # tokens each image occupies
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(
        self, images=None, text=None, return_tensors="pt", padding=True, add_special_tokens=False, **kwargs
    ):
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            flat = []
        elif isinstance(images, (list, tuple)):
            flat = [
                image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])
            ]
        else:
            flat = [images]
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat):
            raise ValueError(
                f"the text holds {placeholders} {self.image_token!r} placeholder(s) but {len(flat)} image(s) were given."
            )
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        text_kwargs = {
            k: v for k, v in kwargs.items() if k in ("truncation", "max_length", "return_attention_mask")
        }
        data = dict(
            self.tokenizer(
                expanded,
                return_tensors=return_tensors,
                padding=padding,
                add_special_tokens=add_special_tokens,
                **text_kwargs,
            )
        )
        if flat:
            data["pixel_values"] = self.image_processor(flat, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]
