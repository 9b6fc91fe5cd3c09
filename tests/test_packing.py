"""A packed row gives the same per-token loss as the padded batch (tiny Llama and Qwen2, sdpa and eager)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm.data.collator import MllmCollator, PackingCollator
from mllm.data.dataset import SupervisedDataset
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor
from tests.data_fixtures import image, record


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] cross-entropy of each shifted target (0 where ignored), as the model's loss computes it."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape[0], -1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_packed_equals_padded(tiny_components, llm, attn):
    torch.manual_seed(0)
    vision = str(tiny_components["clip-vision"])
    model = MllmForConditionalGeneration.from_components(
        vision, str(tiny_components[llm]), attn_implementation=attn
    ).eval()
    proc = MllmProcessor.from_components(
        vision, str(tiny_components[llm]), num_image_tokens=model.config.num_image_tokens
    )
    records = [
        record("a", ("<image>\nWhat color is the circle?", "red"), images=(image((255, 0, 0)),)),
        record("b", ("How many squares are there?", "two squares"), ("and circles?", "one")),
        record(
            "c", ("<image>\nDescribe the image.", "a blue circle at the top"), images=(image((0, 0, 255)),)
        ),
    ]
    items = [SupervisedDataset(records, proc, None, 512)[i] for i in range(3)]
    padded = MllmCollator(proc.tokenizer.pad_token_id)(items)
    packed = PackingCollator()(items)
    padded.pop("skipped"), packed.pop("skipped")
    with torch.no_grad():
        out_padded, out_packed = model(**padded), model(**packed)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-4, atol=1e-5)
    per_padded = _token_losses(out_padded.logits, padded["labels"]).sum(1)  # [B]
    losses = _token_losses(out_packed.logits, packed["labels"])[0]
    bounds = torch.tensor([0] + [len(it["input_ids"]) for it in items]).cumsum(0)
    per_packed = torch.stack([losses[bounds[k] : bounds[k + 1] - 1].sum() for k in range(3)])
    torch.testing.assert_close(per_packed, per_padded, rtol=1e-4, atol=1e-4)
    # nothing is supervised across a sample boundary
    assert (losses[bounds[1:-1] - 1] == 0).all()
