"""`ModalityLengthGroupedSampler`: batches of one modality and similar length.

Follows LLaVA's ``LengthGroupedSampler(group_by_modality=True)`` / ``get_modality_length_grouped_indices``
(https://github.com/haotian-liu/LLaVA, ``llava/train/llava_trainer.py``): image and text-only
samples go to separate global batches of ``world_size * batch_size``; like transformers'
``LengthGroupedSampler``, lengths are sorted over megabatches of 50 global batches, so a batch
holds samples of similar length, and the global batches are shuffled. Lengths here are real token counts (image tokens
included), not LLaVA's word-count estimate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ModalityLengthGroupedSampler", "modality_length_grouped_indices", "pack_first_fit_decreasing"]


MEGABATCH_MULT = 50  # global batches sorted together (transformers' LengthGroupedSampler: 50)


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
    megabatch_mult: int = MEGABATCH_MULT,
) -> list[int]:
    """One epoch's order: every run of ``world_size * batch_size`` indices is one modality of similar
    length; the last (possibly short) global batch of each modality is placed last, as in LLaVA.

    Each modality is shuffled and cut into megabatches of ``megabatch_mult`` global batches (fewer
    when the modality has fewer than 4x as many samples, as in transformers'
    ``get_length_grouped_indices``), each sorted by length and cut into global batches; the global
    batches of the epoch are then shuffled. (LLaVA sorts within one global batch only, which
    balances ranks but leaves a single device's padding as random batches have it.)
    """
    if len(lengths) != len(modality):
        raise ValueError(f"got {len(lengths)} lengths but {len(modality)} modality flags.")
    step = world_size * batch_size
    full: list[list[int]] = []
    partial: list[list[int]] = []
    for flag in (True, False):
        members = [i for i, m in enumerate(modality) if bool(m) == flag]
        if not members:
            continue
        mult = max(1, min(megabatch_mult, len(members) // (4 * step)))
        for chunk in _length_grouped([lengths[i] for i in members], mult * step, generator):
            ids = [members[i] for i in chunk]
            for start in range(0, len(ids), step):
                (full if len(ids[start : start + step]) == step else partial).append(
                    ids[start : start + step]
                )
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


def pack_first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``budget`` tokens: first-fit decreasing (Johnson 1973).

    Samples are placed longest first, each into the first row it fits (a max segment tree over the
    rows' free space finds it in O(log n)); a sample longer than ``budget`` gets a row of its own.
    Rows come out in creation order, each listing its samples longest first.
    """
    if budget < 1:
        raise ValueError(f"the packing budget must be >= 1 token, got {budget}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * (2 * size)  # free[size + r] = room left in row r; inner nodes hold the max of children
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if need > budget or free[1] < need:  # no open row fits: open a new one
            r = len(rows)
            rows.append([i])
            room = max(budget - need, 0)
        else:  # descend to the leftmost row with enough room
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= need else 2 * node + 1
            r = node - size
            rows[r].append(i)
            room = free[node] - need
        node = size + r
        free[node] = room
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows
