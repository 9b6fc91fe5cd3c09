"""`ModalityLengthGroupedSampler`: batches of one modality and similar length.

Follows LLaVA's ``LengthGroupedSampler(group_by_modality=True)`` / ``get_modality_length_grouped_indices``
(https://github.com/haotian-liu/LLaVA, ``llava/train/llava_trainer.py``): image and text-only
samples go to separate megabatches of ``world_size * batch_size``, sorted by length inside each
megabatch, and megabatches are shuffled. Lengths here are real token counts (image tokens
included), not LLaVA's word-count estimate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ModalityLengthGroupedSampler", "modality_length_grouped_indices"]


def _length_grouped(lengths: list[int], megabatch: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle, cut into megabatches, sort each by length (longest first)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunks = [order[i : i + megabatch] for i in range(0, len(order), megabatch)]
    return [sorted(chunk, key=lambda i: -lengths[i]) for chunk in chunks]


def modality_length_grouped_indices(
    lengths: Sequence[int],
    modality: Sequence[bool],
    batch_size: int,
    world_size: int,
    generator: torch.Generator,
) -> list[int]:
    """One epoch's order: every run of ``world_size * batch_size`` indices is one modality,
    sorted by length; the last megabatch of each modality (possibly short) is placed last, as in LLaVA."""
    if len(lengths) != len(modality):
        raise ValueError(f"got {len(lengths)} lengths but {len(modality)} modality flags.")
    megabatch = world_size * batch_size
    groups: list[list[list[int]]] = []
    for flag in (True, False):
        members = [i for i, m in enumerate(modality) if bool(m) == flag]
        if members:
            sub = _length_grouped([lengths[i] for i in members], megabatch, generator)
            groups.append([[members[i] for i in chunk] for chunk in sub])
    full = [mb for g in groups for mb in g if len(mb) == megabatch]
    partial = [mb for g in groups for mb in g if len(mb) < megabatch]
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in order for i in full[k]] + [i for mb in partial for i in mb]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields dataset indices so that each (global) batch holds one modality and similar lengths.

    Deterministic for ``seed`` and the epoch (``set_epoch``); ``generator`` overrides both.
    With ``world_size`` > 1 yield the global order and let the distributed wrapper (accelerate)
    split each megabatch across ranks, as transformers' Trainer does.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        modality: Sequence[bool],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}.")
        if len(lengths) != len(modality):
            raise ValueError(f"got {len(lengths)} lengths but {len(modality)} modality flags.")
        self.lengths = list(lengths)  # token counts, image tokens included (SupervisedDataset.lengths)
        self.modality = [bool(m) for m in modality]  # True: the sample has an image
        self.batch_size = batch_size  # per-device batch size
        self.world_size = world_size  # number of data-parallel ranks
        self.seed = seed
        self.generator = generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = self.generator
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
        indices = modality_length_grouped_indices(
            self.lengths, self.modality, self.batch_size, self.world_size, generator
        )
        return iter(indices)
